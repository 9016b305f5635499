"""The examples of README.md and the docs import only public names, and README's run as written."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import numpy as np
import pytest

from conftest import code_blocks, readme_blocks, small_model
from test_cli import write_tiny_mnist

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return code_blocks(page.read_text(), "python")


def readme_block(section: str, index: int = 0) -> str:
    return readme_blocks(section, "python")[index]


def kerasonspark_imports(code: str) -> list[tuple[str, str | None]]:
    """(module, name) for every import of kerasonspark in ``code``; name is None for ``import
    m``."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(code)):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("kerasonspark")
        ):
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.startswith("kerasonspark")]
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_import_only_public_names(page):
    for code in python_blocks(page):
        if "--8<--" in code:  # a snippet of examples/custom_engine.py, which has its own test
            continue
        for module, name in kerasonspark_imports(code):
            assert not any(part.startswith("_") for part in module.split(".")), (
                f"{page.name}: {module}"
            )
            if name is not None:
                public = importlib.import_module(module).__all__
                assert name in public, f"{page.name}: {name} is not in {module}.__all__"


@pytest.mark.spark
def test_readmes_minimal_example_runs_as_written(spark, tmp_path, monkeypatch):
    write_tiny_mnist(tmp_path)
    monkeypatch.setenv("KERASONSPARK_DATA", str(tmp_path))  # where load_mnist() looks first
    namespace: dict = {}
    exec(readme_block("Minimal example"), namespace)
    result, trainer = namespace["result"], namespace["trainer"]
    assert namespace["spark"] is spark  # start_session joined the running session
    assert sorted(result.history) == ["accuracy", "loss", "val_accuracy", "val_loss"]
    assert result.stats["backend"] == "async" and result.stats["exchanges"] > 0
    assert not np.allclose(
        result.model.get_weights()[0], namespace["ks"].mnist_cnn().get_weights()[0]
    )
    assert set(trainer.evaluate(namespace["test_df"])) == {"loss", "accuracy"}
    assert trainer.predict(namespace["test_df"]).count() == 100


def test_the_docs_home_page_shows_readmes_minimal_example():
    # One example, run above: the docs' front page shows the same code.
    assert python_blocks(ROOT / "docs" / "index.md")[0] == readme_block("Minimal example")


def test_readmes_settings_example_builds_the_trainer_it_describes():
    import kerasonspark as ks

    namespace = {"ks": ks, "model": small_model()}
    exec(readme_block("Minimal example", 1), namespace)
    config = namespace["trainer"].config
    assert (
        config.num_workers,
        config.failure.max_restarts,
        config.failure.restart_with_fewer_workers,
    ) == (4, 5, True)
    assert config.data.partition_storage == "stream" and config.resources.worker_threads == 2
