"""The docs stay true to the code and findable: the generated pages are current, the README stays short, every
relative link resolves, and every config field we add is in the configuration reference. No models are built."""

import importlib.util
import re
from pathlib import Path

import pytest
from trl import DistillationConfig
from trl.experimental.gkd import GKDConfig
from trl.experimental.gold import GOLDConfig

from speckd_trl import SpecKDConfig, SpecKDDistillationConfig, SpecKDGOLDConfig


REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("docs", REPO / "tools" / "docs.py")  # a script, not a package module
docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs)
DOCS = REPO / "docs"
README = REPO / "README.md"
MARKDOWN = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 210


@pytest.mark.parametrize("name", sorted(docs.PAGES))
def test_generated_page_is_current(name):
    path = DOCS / name
    assert path.exists(), f"{path} is missing: run `python tools/docs.py`"
    text = path.read_text()
    other = docs.rendered_by_another_python(name, text)
    if other:
        pytest.skip(f"{name} was rendered by Python {other}'s argparse, whose layout may differ from this Python's")
    assert text == docs.PAGES[name](), f"{path} is stale: run `python tools/docs.py` and commit the result"


def test_check_reports_a_stale_page(tmp_path, capsys):
    assert docs.main(["--docs-dir", str(tmp_path)]) == 0
    assert docs.main(["--check", "--docs-dir", str(tmp_path)]) == 0
    (tmp_path / docs.CONFIGURATION_PAGE).write_text("# hand-edited\n")
    capsys.readouterr()
    assert docs.main(["--check", "--docs-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert docs.CONFIGURATION_PAGE in out and "python tools/docs.py" in out
    assert docs.PLAN_CLI_PAGE not in out


def test_layout_names_every_module():
    """docs/development.md's layout block is the generated one and has a line for every module of the package."""
    page = (DOCS / docs.DEVELOPMENT_PAGE).read_text()
    block = page.split(docs.LAYOUT_BEGIN, 1)[1].split(docs.LAYOUT_END, 1)[0]
    missing = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / "speckd_trl").rglob("*.py"))
        if path.name != "__init__.py" and not re.search(rf"^ +{re.escape(path.name)} ", block, flags=re.M)
    ]
    assert not missing, f"docs/development.md's layout lacks {missing}: run `python tools/docs.py`"


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the details to a page under docs/"
    )


def readme_commands() -> tuple[str, str]:
    """The README's two set-up commands: the line after `# 1.` (the demo) and the line after `# 2.` (the tests)."""
    lines = README.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("# 1. "))
    second = next(i for i, line in enumerate(lines) if line.startswith("# 2. "))
    return lines[first + 1], lines[second + 1]


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs the README's test command verbatim."""
    demo, tests = readme_commands()
    assert demo.endswith("speckd-trl demo --config examples/demo.yaml")
    assert tests.endswith("ruff check . && python -m pytest")
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()


def test_readme_first_screen_shows_the_swap_then_the_commands():
    """A newcomer's first screen: the pitch, the swap from TRL's GKD (within 30 lines), the two commands after it."""
    lines = README.read_text().splitlines()
    swap = next(
        i for i, line in enumerate(lines) if line.startswith("from speckd_trl import SpecKDConfig, SpecKDTrainer")
    )
    assert swap < 30 and "GKDTrainer" in lines[swap]
    assert swap < lines.index(readme_commands()[0]) < 40


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(text: str) -> list[str]:
    """Targets of the markdown links and images in `text` outside code, without web links and pure anchors."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)  # fenced code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    targets = LINK.findall(text)
    return [t for t in targets if not t.startswith(("http://", "https://", "mailto:", "#"))]


def test_link_finder():
    text = (
        "[a](docs/x.md#part) ![img](demo.png) [web](https://x.org) [anchor](#y) `[code](no.md)`\n```\n[f](z.md)\n```\n"
    )
    assert relative_links(text) == ["docs/x.md#part", "demo.png"]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    broken = []
    for target in relative_links(path.read_text()):
        file = target.split("#", 1)[0]
        if not (path.parent / file).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(REPO)} links to files that do not exist: {broken}"


@pytest.mark.parametrize(
    "config_class, base_class",
    [(SpecKDConfig, GKDConfig), (SpecKDDistillationConfig, DistillationConfig), (SpecKDGOLDConfig, GOLDConfig)],
)
def test_configuration_reference_lists_every_added_field(config_class, base_class):
    page = (DOCS / docs.CONFIGURATION_PAGE).read_text()
    section = page.split(f"## `{config_class.__name__}`", 1)
    assert len(section) == 2, f"docs/configuration.md has no section for {config_class.__name__}"
    body = section[1].split("\n## ", 1)[0]
    added = [f.name for f in docs.added_fields(config_class, base_class)]
    assert added, f"{config_class.__name__} adds no field over {base_class.__name__}?"
    missing = [name for name in added if f"| `{name}` |" not in body]
    assert not missing, f"docs/configuration.md lacks {missing}: run `python tools/docs.py`"
