"""The package's shape, checked: no import cycles, no command module importing another (the
pipeline, which runs the other commands as its stages, excepted), heavy libraries imported only
inside the functions that use them, and docs/records.md generated from genssd_cli/rundir/records.py."""

from __future__ import annotations

import ast
from pathlib import Path

from genssd_cli.rundir import records, records_doc

PACKAGE = Path(__file__).resolve().parent.parent / "genssd_cli"
# The modules that implement a `genssd` command (cli.py dispatches to them).
COMMANDS = {"runner", "train", "eval", "doctor", "report", "pipeline", "bench", "tune", "export"}
# The pipeline's stages are the other commands, run in process; so are tune's grid points (runs).
ALLOWED = {
    ("pipeline", "runner"),
    ("pipeline", "train"),
    ("pipeline", "eval"),
    ("pipeline", "report"),
    ("tune", "runner"),
}
HEAVY = {"torch", "transformers", "trl", "peft", "datasets", "vllm", "ray", "accelerate", "matplotlib"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__") or "__init__"


def import_graph() -> dict[str, set[str]]:
    """Each module's genssd_cli imports, lazy ones (inside functions) included."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("genssd_cli"):
                base = node.module.removeprefix("genssd_cli").lstrip(".")
                targets = [f"{base}.{a.name}".lstrip(".") for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name.removeprefix("genssd_cli.") for a in node.names if a.name.startswith("genssd_cli.")]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def family(module: str) -> str:
    return module.split(".")[0]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_no_command_module_imports_another():
    crossings = {
        (family(m), family(d))
        for m, deps in import_graph().items()
        for d in deps
        if family(m) in COMMANDS and family(d) in COMMANDS and family(m) != family(d)
    }
    assert crossings - ALLOWED == set()


def test_heavy_libraries_are_imported_inside_the_functions_that_use_them():
    """`genssd --help` and the light commands never pay for torch."""
    top_level = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])  # fmt: skip
            top_level += [f"{module_name(path)}: {n}" for n in names if n.split(".")[0] in HEAVY]
    assert top_level == []


def test_the_module_map_names_every_module():
    """docs/architecture.md's module map is where a contributor starts: no module is missing from it."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    assert {m for m in modules if f"| `{m}` |" not in doc} == set()


def test_records_doc_is_generated_from_the_code():
    doc = PACKAGE.parent / "docs" / "records.md"
    assert doc.read_text(encoding="utf-8") == records_doc.markdown(), (
        "docs/records.md is out of date: python -m genssd_cli.rundir.records_doc > docs/records.md"
    )


def test_records_doc_names_every_event_and_field():
    doc = records_doc.markdown()
    for event in records.EVENTS:
        assert f"### `{event.model_fields['type'].default}`" in doc
        for field in event.model_fields:
            assert f"| `{field}` |" in doc
