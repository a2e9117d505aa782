"""The package's shape, checked: every module belongs to a family (a folder of genssd_cli, one part
of the pipeline) or is one of the shared modules at the top; no import cycle; the boundaries
between families that docs/architecture.md states; heavy libraries imported only inside the
functions that use them; the module map in docs/architecture.md naming every module and no other;
docs/records.md generated from genssd_cli/rundir/records.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from genssd_cli.rundir import records, records_doc

PACKAGE = Path(__file__).resolve().parent.parent / "genssd_cli"
ARCHITECTURE_MD = PACKAGE.parent / "docs" / "architecture.md"

# The folders of genssd_cli, one per part of the pipeline (docs/architecture.md, "The house").
FAMILIES = {
    "cli", "run", "rundir", "shards", "teacher", "student", "train", "eval", "report", "tune", "export", "doctor",
    "pipeline", "bench",
}  # fmt: skip
# The modules at the top that every family may use; they import no family.
SHARED = {"config", "methods", "answers", "stats", "models", "problems", "files", "procs", "errors", "paths", "redact"}
# The package itself, `python -m genssd_cli`, and the old path of the test teacher (kept because
# docs and scripts name `python -m genssd_cli.fake_teacher`).
ENTRY_POINTS = {"__init__", "__main__", "fake_teacher"}
# The families that implement a `genssd` command; their entry point is FAMILY/command.py, except
# bench, whose every module is a `genssd bench` sub-command.
COMMANDS = {"run", "train", "eval", "report", "tune", "export", "doctor", "pipeline", "bench"}
# Commands that run other commands in process: the pipeline's stages, and tune's grid points (runs).
RUNS_COMMANDS = {
    ("pipeline", "run"),
    ("pipeline", "train"),
    ("pipeline", "eval"),
    ("pipeline", "report"),
    ("tune", "run"),
}
# The engine drives the teacher and the student, never the other way round: they import nothing
# from these. The one exception: a teacher reply is logged as it arrives, so teacher/ may import
# the log's schema (rundir/records.py), which is the reply's contract.
BELOW_THE_RUN = {"teacher", "student"}
ABOVE_THEM = {"run", "rundir", "shards", "cli"} | COMMANDS
SCHEMA_FOR_TEACHER = "rundir.records"
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
            # A relative import would be invisible below, and so would every boundary it crosses.
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{name}: use an absolute import"
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("genssd_cli"):
                base = node.module.removeprefix("genssd_cli").lstrip(".")
                targets = [t for t in (f"{base}.{a.name}".lstrip(".") for a in node.names) if t in modules]
                # `from genssd_cli.cli import app` needs only the submodule; a name that is no
                # submodule is read from the package (or module) itself.
                if len(targets) < len(node.names):
                    targets.append(base)
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
    """The folder a module is in (`teacher.servers.local` -> `teacher`), or the top-level module's name."""
    return module.split(".")[0]


def is_command_module(module: str) -> bool:
    f = family(module)
    return f in COMMANDS and (f == "bench" or module == f"{f}.command")


def boundary_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that crosses a boundary docs/architecture.md states, as `importer -> imported: rule`."""
    found = []
    for module, deps in sorted(graph.items()):
        here = family(module)
        for dep in sorted(deps):
            there = family(dep)
            if here == there:
                continue
            if here in BELOW_THE_RUN and there in ABOVE_THEM and not (here == "teacher" and dep == SCHEMA_FOR_TEACHER):
                found.append(f"{module} -> {dep}: {here}/ imports nothing from the run, the run directory, shards, "
                             "the CLI or a command")  # fmt: skip
            if here in SHARED and there not in SHARED:
                found.append(f"{module} -> {dep}: a shared module imports no family")
            if is_command_module(dep) and here != "cli" and (here, there) not in RUNS_COMMANDS:
                found.append(f"{module} -> {dep}: only cli/ imports a command (and the pipeline, tune, the "
                             "commands they run)")  # fmt: skip
            if there == "cli" and here != "__main__":
                found.append(f"{module} -> {dep}: nothing but cli/ and __main__ imports cli/")
    return found


def test_every_module_is_in_a_family_or_shared():
    """`ls genssd_cli` shows the pipeline: each folder is one of its parts, each top-level module a
    shared one. A new folder or top-level module fails here until it is given a place (and the
    boundaries below and docs/architecture.md say what it may import)."""
    tops = {module_name(p).split(".")[0] for p in PACKAGE.rglob("*.py")}
    folders = {p.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE}
    assert folders - FAMILIES == set(), "a folder that is not a family"
    assert tops - folders - SHARED - ENTRY_POINTS == set(), "a top-level module neither shared nor an entry point"
    assert FAMILIES - folders == set(), "a family that no longer exists: drop it from FAMILIES and the docs"


def test_no_import_cycle():
    """No two modules import each other, even through others and even lazily (inside functions)."""
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles():
    """The check above can fail: a planted cycle is found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_no_import_crosses_a_boundary():
    """teacher/ and student/ import nothing from run/, rundir/ (but rundir/records.py for teacher/),
    shards/, cli/ or a command family; shared modules import no family; only cli/ imports a command
    module (FAMILY/command.py, any of bench/), and the pipeline and tune the commands they run;
    nothing but cli/ and __main__ imports cli/. Lazy imports count."""
    assert boundary_violations(import_graph()) == []


def test_the_boundary_checker_finds_planted_violations():
    """The check above can fail: one planted crossing of each boundary is reported, and the
    crossings the rules allow are not."""
    graph = {
        "teacher.pool": {"run.engine", "rundir.records", "config"},  # records: the reply's schema, allowed
        "student.scorer": {"rundir.records"},  # student/ gets no such exception
        "config": {"teacher.endpoint"},
        "eval.command": {"run.command"},
        "pipeline.command": {"run.command", "shards.local"},  # the pipeline's stages, allowed
        "report.command": {"eval.outdir", "bench.scoring"},  # eval's outdir is no command; bench is
        "run.engine": {"cli.common"},
        "cli.run": {"run.command", "cli.common"},
        "__main__": {"cli.app"},
    }
    assert [v.split(":")[0] for v in boundary_violations(graph)] == [
        "config -> teacher.endpoint",
        "eval.command -> run.command",
        "report.command -> bench.scoring",
        "run.engine -> cli.common",
        "student.scorer -> rundir.records",
        "teacher.pool -> run.engine",
    ]


def test_heavy_libraries_are_imported_inside_the_functions_that_use_them():
    """`genssd --help` and the light commands never pay for torch."""
    top_level = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])  # fmt: skip
            top_level += [f"{module_name(path)}: {n}" for n in names if n.split(".")[0] in HEAVY]
    assert top_level == []


def mapped_modules(doc: str) -> set[str]:
    """The modules docs/architecture.md's module map names: the first cell of each table row of
    its "Module map" section, a path relative to genssd_cli such as `teacher/pool.py`."""
    section = f"\n{doc}".split("\n## Module map", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+\.py)` \|", section, flags=re.MULTILINE))


def package_modules() -> set[str]:
    """Every module of genssd_cli, subfolders included; an empty `__init__.py` only marks a folder."""
    return {
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py" or p.read_text(encoding="utf-8").strip()
    }


def test_the_module_map_names_every_module_and_no_other():
    """docs/architecture.md's module map is where a contributor starts: every module of genssd_cli
    (subfolders included) has its row, and no row names a module that is gone."""
    mapped = mapped_modules(ARCHITECTURE_MD.read_text(encoding="utf-8"))
    modules = package_modules()
    missing, gone = sorted(modules - mapped), sorted(mapped - modules)
    assert not missing, f"modules without a row in docs/architecture.md's module map: {', '.join(missing)}"
    assert not gone, f"rows of docs/architecture.md's module map naming no module: {', '.join(gone)}"


def test_the_module_map_reader_sees_rows():
    """The check above can fail: the reader finds the rows of the map section and only those."""
    doc = "## Module map\n\n| module | what |\n|---|---|\n| `teacher/pool.py` | the pool |\n\n## Next\n| `x.py` | |\n"
    assert mapped_modules(doc) == {"teacher/pool.py"}
    assert "teacher/pool.py" in package_modules()


def test_records_doc_is_generated_from_the_code():
    """docs/records.md is what records_doc.py makes of the record models today."""
    doc = PACKAGE.parent / "docs" / "records.md"
    assert doc.read_text(encoding="utf-8") == records_doc.markdown(), (
        "docs/records.md is out of date: python -m genssd_cli.rundir.records_doc > docs/records.md"
    )


def test_records_doc_names_every_event_and_field():
    """The generator leaves out no event type and no field."""
    doc = records_doc.markdown()
    for event in records.EVENTS:
        assert f"### `{event.model_fields['type'].default}`" in doc
        for field in event.model_fields:
            assert f"| `{field}` |" in doc
