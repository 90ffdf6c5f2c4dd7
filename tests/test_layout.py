"""The package's layout is a contract: the library never imports the demo application or the test helpers of
`speckd_trl/tools/`, nothing in the package but those helpers imports them, and every `speckd_trl` name that the
benchmarks, examples, tests and developer scripts (`tools/`) import exists (a module moved under them once broke a
benchmark, whose imports sit inside functions that no test runs)."""

import ast
import importlib
import re
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "speckd_trl"
# The package root re-exports the public API, and the console script runs the demo: entry points, not library code.
ENTRY_POINTS = {"__init__.py", "__main__.py", "cli.py"}
LIBRARY = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ENTRY_POINTS)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the `speckd_trl` modules that `path` imports (relative imports resolved)."""
    package = ["speckd_trl", *path.relative_to(PACKAGE).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("speckd_trl")}


def test_library_modules_are_the_expected_ones():
    assert LIBRARY == [
        "batch_kind.py",
        "batches.py",
        "chunked.py",
        "compat.py",
        "config.py",
        "cross_tokenizer.py",
        "data.py",
        "distillation_trainer.py",
        "divergence.py",
        "drafter.py",
        "gated_trainer.py",
        "generation.py",
        "gold_trainer.py",
        "losses.py",
        "metrics.py",
        "models.py",
        "packing.py",
        "plan.py",
        "reduction.py",
        "reward.py",
        "rules.py",
        "schedules.py",
        "server_teacher.py",
        "server_trainer.py",
        "sparse_teacher.py",
        "teacher_cache.py",
        "teacher_check.py",
        "trainer.py",
        "validation.py",
        "weighting.py",
    ]


@pytest.mark.parametrize("name", LIBRARY)
def test_library_does_not_import_demo_or_tools(name):
    imported = imported_modules(PACKAGE / name)
    outside = sorted(m for m in imported if m.startswith(("speckd_trl.demo", "speckd_trl.tools")))
    assert not outside, f"library module {name} imports {outside}"


def test_only_the_tools_import_the_tools():
    """No arrow runs from the package (library, entry points, demo) into `speckd_trl/tools/`: what the library or the
    console script needs is a library module."""
    outside = [p for p in PACKAGE.rglob("*.py") if "tools" not in p.relative_to(PACKAGE).parts]
    offending = {
        str(path.relative_to(PACKAGE)): sorted(m for m in imported_modules(path) if m.startswith("speckd_trl.tools"))
        for path in outside
    }
    offending = {name: modules for name, modules in offending.items() if modules}
    assert not offending, f"modules outside speckd_trl/tools/ import it: {offending}"


def test_tools_do_not_import_the_demo():
    for path in (PACKAGE / "tools").glob("*.py"):
        imported = imported_modules(path)
        assert not [m for m in imported if m.startswith("speckd_trl.demo")], path.name


def test_import_resolution_sees_relative_imports():
    """The checker itself: a relative import from the demo resolves to its absolute module name."""
    assert "speckd_trl.drafter" in imported_modules(PACKAGE / "demo" / "app.py")
    assert "speckd_trl.config" in imported_modules(PACKAGE / "tools" / "testing.py")


def _absolute_imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) of every `from speckd_trl... import name` and `import speckd_trl...` in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("speckd_trl"):
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.startswith("speckd_trl")]
    return found


SCRIPTS = sorted(p for folder in ("benchmarks", "examples", "tests", "tools") for p in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_speckd_trl_import_resolves(path):
    for module, name in _absolute_imports(path):
        imported = importlib.import_module(module)
        if name is not None and not hasattr(imported, name):
            importlib.import_module(f"{module}.{name}")  # a submodule, or ModuleNotFoundError names it


# A comparison with a gate rule's name: `gate == "topk"`, `"spec" != x`, `"none" in (...)`.
RULE_NAME_COMPARISON = re.compile(
    r"""(==|!=)\s*['"](topk|spec|none)['"]|['"](topk|spec|none)['"]\s*(==|!=|\bin\b|\bnot in\b)"""
)


def test_only_the_rules_module_compares_gate_names():
    """Configs, trainers, weighting, generation and the benchmarks ask the rule (`rules.GateRule`'s attributes and
    methods) instead of comparing its name: a new rule is then one class in `rules.py` (the planner's `teacher_quant`
    values share the word "none" and are not gate names)."""
    offending = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]):
        if path.name == "rules.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "gate" in line and RULE_NAME_COMPARISON.search(line):
                offending.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offending, "compare with the rule's attributes instead:\n" + "\n".join(offending)


def test_the_name_check_finds_a_comparison():
    assert RULE_NAME_COMPARISON.search('if self.args.gate == "spec":')
    assert RULE_NAME_COMPARISON.search("if 'topk' != args.gate:")
    assert not RULE_NAME_COMPARISON.search('if self.teacher_quant != "nf4":')


# A comparison with a mode's name (the modes a config resolves into objects: `GateConfigMixin.modes`). Names used only
# as modes are caught anywhere; names that are ordinary words elsewhere (a teacher-reads key "top_k", a batch) only on a
# line that names their field.
MODE_NAMES = "constant|linear|greedy|eager|chunked|speculative|accepted"
FIELD_MODE_NAMES = "teacher|top_k|tokens|sample|batch|student"
MODE_FIELDS = re.compile(r"reject_target|normalize|proposal|mixing|on_policy_generation|\bmode\b")


def _comparison(names: str) -> re.Pattern:
    return re.compile(rf"""(==|!=)\s*['"]({names})['"]|['"]({names})['"]\s*(==|!=|\bin\b|\bnot in\b)""")


MODE_NAME_COMPARISON, FIELD_MODE_NAME_COMPARISON = _comparison(MODE_NAMES), _comparison(FIELD_MODE_NAMES)
# The planner (`speckd-trl plan`) describes a run from its own `PlanConfig` without building one (it imports nothing
# from the package, so that planning needs no model); it and the benchmark that checks it keep their own strings.
PLANNER = {"speckd_trl/plan.py", "benchmarks/plan_check.py"}


def compares_a_mode_name(line: str) -> bool:
    return bool(
        MODE_NAME_COMPARISON.search(line) or (FIELD_MODE_NAME_COMPARISON.search(line) and MODE_FIELDS.search(line))
    )


def test_only_the_configs_resolve_mode_names():
    """Every mode (the schedules, the proposal, the loss path, the reject target, the normalization, the mixing, the
    on-policy generation) is resolved once from its config field into an object (`config.GateModes`), which the
    trainers, the gate and the loss ask instead of comparing the name: a new mode is one object where its job is
    done."""
    offending = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]):
        name = str(path.relative_to(REPO))
        if name in PLANNER:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if compares_a_mode_name(line):
                offending.append(f"{name}:{number}: {line.strip()}")
    assert not offending, "ask the resolved mode (`args.modes`) instead:\n" + "\n".join(offending)


def test_the_mode_check_finds_a_comparison():
    assert compares_a_mode_name('if self.gate_top_k_schedule == "constant":')
    assert compares_a_mode_name("if self.args.loss_path == 'chunked':")
    assert compares_a_mode_name('if mode == "greedy":')
    assert compares_a_mode_name('if mode == "sample":')
    assert compares_a_mode_name('if self.gate.args.reject_target != "teacher":')
    assert compares_a_mode_name('if mixing == "batch":')
    assert compares_a_mode_name('speculative = args.on_policy_generation == "speculative"')
    assert not compares_a_mode_name('if "top_k" in self._gate.rule.teacher_reads:')
    assert not compares_a_mode_name('for role in ("student", "teacher"):')


# A type test on a batch kind: `isinstance(kind, str)`, `isinstance(self.kind, torch.Tensor)`.
KIND_TYPE_TEST = re.compile(r"isinstance\(\s*[\w.]*kind\w*\s*,")


def test_batch_kinds_are_read_through_their_methods():
    """A batch kind is a `batch_kind.BatchKind`, read through its methods (`positions`, `all_dataset`, `where`, ...):
    nothing tests its type to tell an on-policy batch, a dataset batch and a mixed one apart."""
    offending = []
    for folder in (PACKAGE, REPO / "benchmarks", REPO / "tools", REPO / "tests"):
        for path in sorted(folder.rglob("*.py")):
            if path == Path(__file__).resolve():
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if KIND_TYPE_TEST.search(line):
                    offending.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offending, "read the BatchKind through its methods instead:\n" + "\n".join(offending)


def test_the_kind_check_finds_a_type_test():
    assert KIND_TYPE_TEST.search("if isinstance(kind, str) and kind == ON_POLICY:")
    assert KIND_TYPE_TEST.search("if isinstance(self.kind, torch.Tensor):")
    assert not KIND_TYPE_TEST.search("if isinstance(teacher_model, str):")


def test_library_imports_have_no_cycle():
    """Every import between library modules runs one way (a module can be read knowing only those it imports)."""
    graph = {
        name: {m.split(".")[1] + ".py" for m in imported_modules(PACKAGE / name) if m.count(".") >= 1} & set(LIBRARY)
        for name in LIBRARY
    }
    visiting, done = set(), set()

    def visit(node, path):
        assert node not in visiting, "import cycle: " + " -> ".join([*path, node])
        if node in done:
            return
        visiting.add(node)
        for nxt in sorted(graph[node] - {node}):
            visit(nxt, [*path, node])
        visiting.discard(node)
        done.add(node)

    for name in LIBRARY:
        visit(name, [])
