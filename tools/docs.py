"""The docs pages that are generated from the code, so that each field's meaning is written once (its
`metadata["help"]`) and the planner's options once (its `argparse` parser):

- `docs/configuration.md`: one table per config class (`SpecKDConfig`, `SpecKDDistillationConfig`) of the fields it
  adds over its TRL base, read from `dataclasses.fields`;
- `docs/plan-cli.md`: `speckd-trl plan --help`, rendered at a fixed width;
- the package layout in `docs/development.md` (between `LAYOUT_BEGIN` and `LAYOUT_END`; the rest of that page is
  written by hand): one line per module, the first paragraph of its opening docstring.

    python tools/docs.py           # rewrite the pages
    python tools/docs.py --check   # exit 1 and list the pages that differ from what the code renders

`tests/test_docs.py` fails when a page is stale. A developer script beside the package, not part of it: it imports
the `speckd_trl` of this checkout (and its `cli`), the library never imports it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's speckd_trl, whatever else is installed
DOCS = REPO / "docs"
CONFIGURATION_PAGE = "configuration.md"
PLAN_CLI_PAGE = "plan-cli.md"
DEVELOPMENT_PAGE = "development.md"
PACKAGE = REPO / "speckd_trl"
HELP_WIDTH = 100  # columns of the rendered `--help`: fixed, so that the page does not depend on the terminal
REGENERATE = "python tools/docs.py"
GENERATED_NOTE = f"<!-- Generated from the code by `{REGENERATE}`: edit the code, not this page. -->"
LAYOUT_BEGIN = f"<!-- Generated from each module's opening docstring by `{REGENERATE}`: edit the docstrings. -->"
LAYOUT_END = "<!-- End of the generated layout. -->"
LAYOUT_WIDTH = 119  # the line length of the code (pyproject.toml)
LAYOUT_COLUMN = 19  # where the summaries start

CONFIGURATION_HEADER = f"""\
# Configuration reference

{GENERATED_NOTE}

`SpecKDConfig` extends TRL's `trl.experimental.gkd.GKDConfig` (and with it `SFTConfig` and `TrainingArguments`);
`SpecKDDistillationConfig` extends TRL's `trl.DistillationConfig`; `SpecKDServerDistillationConfig` extends
`trl.experimental.server_distillation.ServerDistillationConfig` (a teacher on a vLLM server); `SpecKDGOLDConfig`
extends `trl.experimental.gold.GOLDConfig` (across tokenizers). The tables list only the fields these classes add (and, for the server config, the defaults it changes). **Every field of TRL's configs
keeps TRL's meaning and default** (see TRL's documentation), with these exceptions: an unset `bf16` means bf16 where
the GPU supports it and float32 elsewhere (TRL's `bf16=True` default fails on a CPU); the server config defaults to
`beta=0.0` and `loss_top_k=20`, the gated server loss.

Every value is checked when the config is built: a bad one raises a `ValueError` that names the field, the value and
what is allowed. Every field is also a flag of the `speckd-trl` command (`--gate topk`, `--config recipe.yaml` reads
the same keys from YAML; `speckd-trl --help` prints them all), except `SpecKDGOLDConfig`'s, which is Python only.

What the gate's settings do: [Concepts](concepts.md). The loss paths, the teacher's loading and what differs from
GKD: [SpecKDTrainer](speckd-trainer.md). The trainer on `DistillationTrainer`:
[SpecKDDistillationTrainer](distillation-trainer.md). Across tokenizers: [SpecKDGOLDTrainer](gold-trainer.md).
"""


def added_fields(config_class: type, base_class: type) -> list[dataclasses.Field]:
    """The dataclass fields of `config_class` that `base_class` does not have, or has with another default or help, in
    declaration order."""
    inherited = {f.name: f for f in dataclasses.fields(base_class)}
    return [
        f
        for f in dataclasses.fields(config_class)
        if f.name not in inherited
        or default_value(f) != default_value(inherited[f.name])
        or f.metadata.get("help") != inherited[f.name].metadata.get("help")  # a field redefined with our meaning
    ]


def written_annotation(config_class: type, name: str) -> Any:
    """The annotation of field `name` as its class wrote it: `dataclasses.Field.type` is not used, since
    `HfArgumentParser` (which `TrlParser` builds on) replaces it in place with the resolved type (`int | None`
    becomes `int`) the first time it parses the class."""
    for klass in config_class.__mro__:
        if name in vars(klass).get("__annotations__", {}):
            return vars(klass)["__annotations__"][name]
    raise KeyError(name)


def type_name(annotation: Any) -> str:
    """A field's type as written in the code (`int | None`)."""
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _value(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def default_value(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _value(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _value(f.default_factory())
    return "required"


def _cell(text: str) -> str:
    """Text made safe for one markdown table cell: one line, `|` escaped."""
    return re.sub(r"\s+", " ", text).strip().replace("|", "\\|")


def config_table(config_class: type, base_class: type) -> str:
    """The markdown table of the fields `config_class` adds over `base_class`: name, type, default, choices, help."""
    rows = [
        "| field | type | default | choices | meaning |",
        "|---|---|---|---|---|",
    ]
    for f in added_fields(config_class, base_class):
        choices = f.metadata.get("choices")
        rows.append(
            "| "
            + " | ".join(
                [
                    f"`{f.name}`",
                    f"`{_cell(type_name(written_annotation(config_class, f.name)))}`",
                    f"`{_cell(default_value(f))}`",
                    ", ".join(f"`{_cell(_value(c))}`" for c in choices) if choices else "",
                    _cell(f.metadata.get("help", "")),
                ]
            )
            + " |"
        )
    return "\n".join(rows)


def _config_classes() -> list[tuple[type, type, str, str]]:
    """(our config, its TRL base, the base's public name, the trainer it configures)."""
    from trl import DistillationConfig
    from trl.experimental.gkd import GKDConfig
    from trl.experimental.gold import GOLDConfig
    from trl.experimental.server_distillation import ServerDistillationConfig

    from speckd_trl import SpecKDConfig, SpecKDDistillationConfig, SpecKDGOLDConfig, SpecKDServerDistillationConfig

    return [
        (SpecKDConfig, GKDConfig, "trl.experimental.gkd.GKDConfig", "SpecKDTrainer"),
        (SpecKDDistillationConfig, DistillationConfig, "trl.DistillationConfig", "SpecKDDistillationTrainer"),
        (
            SpecKDServerDistillationConfig,
            ServerDistillationConfig,
            "trl.experimental.server_distillation.ServerDistillationConfig",
            "SpecKDServerDistillationTrainer",
        ),
        (SpecKDGOLDConfig, GOLDConfig, "trl.experimental.gold.GOLDConfig", "SpecKDGOLDTrainer"),
    ]


def _names(names: Sequence[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)


def render_configuration() -> str:
    """The text of `docs/configuration.md`."""
    from speckd_trl.config import GateConfigMixin

    shared = [f.name for f in dataclasses.fields(GateConfigMixin)]
    sections = [CONFIGURATION_HEADER]
    for config_class, base_class, base, trainer in _config_classes():
        own = [f.name for f in added_fields(config_class, base_class) if f.name not in shared]
        lines = [
            f"## `{config_class.__name__}`",
            "",
            f"Configures `{trainer}`; extends `{base}`. The gate's fields come from `GateConfigMixin`, shared by every "
            f"SpecKD config: {_names(shared)}.",
        ]
        if own:
            lines[-1] += f" Its own: {_names(own)}."
        lines += ["", config_table(config_class, base_class), ""]
        sections.append("\n".join(lines))
    return "\n".join(sections)


def plan_help(width: int = HELP_WIDTH) -> str:
    """`speckd-trl plan --help`, formatted for a terminal `width` columns wide."""
    from speckd_trl.cli import make_plan_parser

    parser = make_plan_parser()
    formatter = parser.formatter_class
    parser.formatter_class = lambda prog: formatter(prog, width=width)
    if hasattr(parser, "color"):  # Python 3.14+: no colour codes in the page
        parser.color = False
    return parser.format_help()


def _python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


PLAN_CLI_PYTHON = re.compile(r"Python (\d+\.\d+)'s `argparse`")


def render_plan_cli() -> str:
    """The text of `docs/plan-cli.md`."""
    return f"""\
# `speckd-trl plan` options

{GENERATED_NOTE}

The memory planner's options, as `speckd-trl plan --help` prints them (Python {_python()}'s `argparse`,
{HELP_WIDTH} columns). What the planner models, a worked example and how its estimates compare with measured
peaks: [One GPU](one-gpu.md#will-it-fit-speckd-trl-plan).

```text
$ speckd-trl plan --help
{plan_help().rstrip()}
```
"""


def module_summary(path: Path) -> str:
    """The first paragraph of the module's opening docstring, on one line."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _layout_line(name: str, summary: str, indent: int) -> str:
    prefix = " " * indent + name
    prefix = prefix.ljust(LAYOUT_COLUMN) if len(prefix) < LAYOUT_COLUMN else prefix + "  "
    return textwrap.fill(
        summary,
        width=LAYOUT_WIDTH,
        initial_indent=prefix,
        subsequent_indent=" " * LAYOUT_COLUMN,
        break_long_words=False,
        break_on_hyphens=False,
    )


def _package_lines(folder: Path, indent: int) -> list[str]:
    """A package's line (its `__init__.py`'s summary), then its modules' and its sub-packages', in name order."""
    lines = [_layout_line(f"{folder.name}/", module_summary(folder / "__init__.py"), indent)]
    for path in sorted(p for p in folder.glob("*.py") if p.name != "__init__.py"):
        lines.append(_layout_line(path.name, module_summary(path), indent + 2))
    for sub in sorted(p for p in folder.iterdir() if (p / "__init__.py").is_file()):
        lines += _package_lines(sub, indent + 2)
    return lines


def render_layout() -> str:
    """The package layout: a code block of one line per module, from its opening docstring."""
    return "```text\n" + "\n".join(_package_lines(PACKAGE, 0)) + "\n```"


def render_development(page: Path | None = None) -> str:
    """The text of `docs/development.md` (read from `page`, by default the repository's) with its layout block
    rendered anew."""
    text = (page or DOCS / DEVELOPMENT_PAGE).read_text()
    if text.count(LAYOUT_BEGIN) != 1 or text.count(LAYOUT_END) != 1:
        raise ValueError(f"{DEVELOPMENT_PAGE} must hold the lines {LAYOUT_BEGIN!r} and {LAYOUT_END!r} once each.")
    before, rest = text.split(LAYOUT_BEGIN)
    after = rest.split(LAYOUT_END)[1]
    return f"{before}{LAYOUT_BEGIN}\n{render_layout()}\n{LAYOUT_END}{after}"


PAGES: dict[str, Callable[[], str]] = {
    CONFIGURATION_PAGE: render_configuration,
    PLAN_CLI_PAGE: render_plan_cli,
    DEVELOPMENT_PAGE: render_development,
}


def rendered_by_another_python(name: str, text: str) -> str | None:
    """For a page whose text depends on the Python version (`argparse`'s layout changes between releases): the
    version that rendered `text` when it is not the running one, else None."""
    if name != PLAN_CLI_PAGE:
        return None
    found = PLAN_CLI_PYTHON.search(text)
    return found.group(1) if found and found.group(1) != _python() else None


def stale_pages(docs_dir: Path = DOCS) -> tuple[list[Path], list[Path]]:
    """(pages that differ from what the code renders now, pages not compared because another Python rendered
    them)."""
    stale, skipped = [], []
    for name, render in PAGES.items():
        path = docs_dir / name
        current = path.read_text() if path.exists() else None
        if current is not None and rendered_by_another_python(name, current):
            skipped.append(path)
        elif current != render():
            stale.append(path)
    return stale, skipped


def write_pages(docs_dir: Path = DOCS) -> list[Path]:
    """Rewrite every generated page; return the ones whose text changed."""
    changed = []
    for name, render in PAGES.items():
        path = docs_dir / name
        text = render()
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(path)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=REGENERATE, description="Rewrite the docs pages generated from the code (or check that they are current)."
    )
    parser.add_argument("--check", action="store_true", help="Write nothing; exit 1 if a page is stale.")
    parser.add_argument("--docs-dir", type=Path, default=DOCS, help=f"Where the pages live (default: {DOCS}).")
    args = parser.parse_args(argv)
    if args.check:
        stale, skipped = stale_pages(args.docs_dir)
        for path in skipped:
            version = rendered_by_another_python(path.name, path.read_text())
            print(f"not compared: {path} (rendered by Python {version}, this is Python {_python()})")
        for path in stale:
            print(f"stale: {path}")
        if stale:
            print(f"Run `{REGENERATE}` to rewrite them.")
            return 1
        return 0
    for path in write_pages(args.docs_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
