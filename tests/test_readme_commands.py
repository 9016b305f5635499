"""README's install and test commands are what CI runs, and everything the repository imports is
declared.

CI (``.ci/run``) installs into a fresh virtual environment, so an undeclared dependency of a test
fails there; these checks say which one, and also cover the benchmarks and examples that the suite
does not run.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

from conftest import readme_blocks

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("kerasonspark", "backends", "tests", "examples", "benchmarks", "docs", "docker")
# Modules of this repository that scripts import by their folder's name, not from an installed
# package.
LOCAL_DIRS = ("tests", "examples", "benchmarks", "docs")


def _bash_block(section: str) -> list[str]:
    """The commands of the first bash block under README's ``## {section}``, comments stripped."""
    lines = (
        line.split("#", 1)[0].strip() for line in readme_blocks(section, "bash")[0].splitlines()
    )
    return [line for line in lines if line]


def _ci_commands() -> list[str]:
    return [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]


def test_ci_runs_readmes_install_block_word_for_word_in_a_fresh_venv() -> None:
    ci = _ci_commands()
    install = _bash_block("Install")
    assert install, "README's install block is empty"
    for command in install:
        assert command in ci, f".ci/run does not run README's install command {command!r}"
    assert any(line.startswith("python3 -m venv") for line in ci), (
        ".ci/run must create its own venv"
    )
    activate = next(
        i for i, line in enumerate(ci) if line.startswith("source ") and "activate" in line
    )
    assert all(ci.index(command) > activate for command in install), (
        "install after activating the venv"
    )


def test_ci_runs_readmes_test_command() -> None:
    ci = _ci_commands()
    for command in _bash_block("Test command"):
        assert command in ci, f".ci/run does not run README's test command {command!r}"


def _imported_top_level_modules() -> dict[str, set[str]]:
    modules: dict[str, set[str]] = {}
    for folder in SCANNED:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    modules.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return modules


def _is_local(name: str) -> bool:
    return any(
        (ROOT / folder / f"{name}.py").exists() or (ROOT / folder / name).is_dir()
        for folder in LOCAL_DIRS
    )


def test_every_import_of_the_repository_is_installed_by_readmes_install_block() -> None:
    missing = {
        name: sorted(files)
        for name, files in _imported_top_level_modules().items()
        if not _is_local(name)
        and name not in sys.builtin_module_names
        and importlib.util.find_spec(name) is None
    }
    assert not missing, (
        f"imported but not installed by README's install block (declare them in pyproject.toml): "
        f"{missing}"
    )
