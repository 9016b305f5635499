"""The dependency rules of DESIGN.md: the core imports no engine; engines import no other engine."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
    return names


def test_core_never_imports_an_engine():
    for path in (ROOT / "kerasonspark").rglob("*.py"):
        for name in imported_modules(path):
            assert "backends" not in name, f"{path.relative_to(ROOT)} imports {name}"


def test_engines_import_only_the_core():
    engines = {p.stem for p in (ROOT / "backends").glob("*.py") if p.stem != "__init__"}
    for path in (ROOT / "backends").glob("*.py"):
        for name in imported_modules(path):
            assert not name.startswith("."), f"{path.name} uses a relative import: {name}"
            parts = name.split(".")
            assert not (len(parts) > 2 and parts[:2] == ["kerasonspark", "backends"] and parts[2] in engines), \
                f"{path.name} imports another engine: {name}"
