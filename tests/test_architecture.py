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
    "techniques": {"cache", "errors", "graph", "plan", "progress"},
    "io": {"cache", "codec", "errors", "graph", "progress", "techniques", "zoo"},
    "plan": {"data", "errors", "graph"},
    "search": {"io", "plan", "progress", "techniques"},
    "report": {"cache", "graph"},
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


def test_a_technique_never_imports_another():
    folder = SRC / "techniques"
    # a technique is a module or a package (quant); records, allocation, calibration, budget: shared, not techniques
    modules = {f.stem for f in folder.glob("*.py")} - {"__init__", "records", "allocation", "calibration", "budget"}
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
