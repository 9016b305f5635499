"""examples/custom_engine.py, an engine written against the SDK alone, trained in-process and on
local[2]."""

import sys
from pathlib import Path

import numpy as np
import pytest

from kerasonspark import ConfigurationError, SparkTrainer
from kerasonspark.testing import fit_in_process

from conftest import make_blobs, small_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from custom_engine import EpochAveragingEngine  # noqa: E402

FLOOR = 0.9


def test_the_example_imports_only_the_sdk():
    import ast

    source = Path(sys.modules["custom_engine"].__file__).read_text()
    imported = {
        node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)
    }
    imported |= {
        a.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import)
        for a in node.names
    }
    assert {name for name in imported if name and name.startswith("kerasonspark")} == {
        "kerasonspark.engine"
    }


def test_custom_engine_trains_in_process():
    x, y = make_blobs(800)
    result = fit_in_process(
        EpochAveragingEngine(rounds_per_epoch=2),
        small_model(),
        x,
        y,
        epochs=3,
        batch_size=16,
        seed=0,
        validation_data=make_blobs(200, seed=0),
    )
    assert result.history["val_accuracy"][-1] > FLOOR
    # 3 epochs x 2 rounds, every worker at every round
    assert result.stats["exchanges"] == 6 and [w["rounds"] for w in result.stats["workers"]] == [
        6,
        6,
    ]
    assert result.stats["epoch_averaging"] == {"rounds_per_epoch": 2}


@pytest.mark.spark
def test_custom_engine_trains_on_spark(spark):
    x, y = make_blobs(800)
    model = small_model()
    trainer = SparkTrainer(
        model,
        backend=EpochAveragingEngine(),
        num_workers=2,
        epochs=3,
        batch_size=16,
        spark=spark,
        seed=0,
        verbose=0,
    )
    result = trainer.fit(x, y)
    assert result.model is model and result.stats["backend"] == "epoch_averaging"
    assert (
        result.stats["exchanges"] == 3 and sum(w["samples"] for w in result.stats["workers"]) == 800
    )
    assert trainer.evaluate(x, y)["accuracy"] > FLOOR


def test_custom_engine_options_are_validated():
    with pytest.raises(ConfigurationError, match="rounds_per_epoch"):
        EpochAveragingEngine(rounds_per_epoch=0)
    assert np.isclose(EpochAveragingEngine(rounds_per_epoch=3).options.rounds_per_epoch, 3)
