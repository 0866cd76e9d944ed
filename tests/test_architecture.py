"""docs/ARCHITECTURE.md says which package may import which; hold the code to it."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "nnshrink"

ALLOWED = {
    "errors": set(),
    "cache": set(),
    "progress": set(),
    "graph": {"errors"},
    "data": {"cache", "errors"},
    "zoo": {"cache", "data", "errors", "progress"},
    "codec": {"errors"},
    "techniques": {"cache", "errors", "graph", "plan", "progress", "search"},  # search: engine, allocate only
    "io": {"cache", "codec", "errors", "graph", "progress", "techniques", "zoo"},
    "plan": {"data", "errors", "graph"},
    "search": {"cache", "errors", "graph", "io", "plan", "progress", "techniques"},
    "report": {"cache", "errors", "graph"},
    "deploy": {"cache", "errors"},
    "testing": set(),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nnshrink."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("nnshrink.")}
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    files = [SRC / f"{package}.py"] if (SRC / f"{package}.py").exists() else list((SRC / package).rglob("*.py"))
    assert files
    used = set().union(*(_imports(f) for f in files)) - {package}
    assert used <= ALLOWED[package], f"{package} imports {sorted(used - ALLOWED[package])}"


ENGINE = {"nnshrink.search.engine", "nnshrink.search.solvers"}


def _modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return found | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_techniques_use_only_the_engine_of_search_and_the_engine_imports_no_technique():
    for f in (SRC / "techniques").rglob("*.py"):
        used = {m for m in _modules(f) if m.startswith("nnshrink.search")}
        assert used <= ENGINE, f"{f.name} imports {sorted(used - ENGINE)}"
    for name in ENGINE:
        f = SRC / "search" / f"{name.rsplit('.', 1)[1]}.py"
        bad = {m for m in _modules(f) if m.startswith(("nnshrink.techniques", "nnshrink.io", "nnshrink.plan"))}
        assert not bad, f"{f.name} imports {sorted(bad)}"


def test_a_technique_never_imports_another():
    folder = SRC / "techniques"
    # a technique is a module or a package (quant); records, allocation, calibration: shared, not techniques
    modules = {f.stem for f in folder.glob("*.py")} - {"__init__", "records", "allocation", "calibration"}
    modules |= {d.name for d in folder.iterdir() if (d / "__init__.py").exists()}
    for f in folder.rglob("*.py"):
        if f.parent == folder and f.stem == "__init__":
            continue
        own = f.parent.name if f.parent != folder else f.stem
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nnshrink.techniques."):
                other = node.module.split(".")[2]
                assert other == own or other not in modules, f"{f.name} imports {node.module}"
