"""MLflow tracking against a real tracking store (SQLite): one run per fit with every epoch's
metrics at the global step, the run's figures, and a model that ``mlflow.pyfunc.spark_udf``
serves as the returned model predicts; ``compare`` leaves nested runs; MLflow's own
``MlflowCallback`` logs at real steps."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pytest

from kerasonspark import ConfigurationError, MlflowConfig, SparkTrainer, compare_strategies
from kerasonspark._tracking import tracking_enabled

from conftest import make_blobs, small_model

pytestmark = pytest.mark.spark


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _runs() -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def _steps(run_id: str, key: str) -> list[int]:
    history = mlflow.MlflowClient().get_metric_history(run_id, key)
    return [m.step for m in sorted(history, key=lambda m: m.step)]


def test_sync_and_async_fits_each_leave_one_run_with_epoch_metrics_figures_and_a_model(
    spark, tracking_uri
):
    from kerasonspark import numpy_to_dataframe
    from kerasonspark.ml import KerasEstimator

    x, y = make_blobs(1600)
    train = numpy_to_dataframe(spark, x[:1200], y[:1200]).cache()
    held_out = numpy_to_dataframe(spark, x[1200:], y[1200:]).cache()
    # sync through Spark ML (its fit logs as SparkTrainer's does), async through SparkTrainer
    estimator = KerasEstimator(
        model=small_model(), backend="sync", epochs=2, validationFraction=0.25, seed=0
    )
    fitted = estimator.fit(train.union(held_out).coalesce(1))
    trainer = SparkTrainer(
        small_model(), backend="async", num_workers=2, epochs=2, spark=spark, verbose=0
    )
    result = trainer.fit(train, validation_data=held_out)
    runs = {run.info.run_name: run for run in _runs()}
    assert sorted(runs) == ["kerasonspark-async", "kerasonspark-sync"]
    served = {}
    for backend, run in (
        ("sync", runs["kerasonspark-sync"]),
        ("async", runs["kerasonspark-async"]),
    ):
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert params["backend"] == backend and params["num_workers"] == "2"
        assert params["optimizer"] == "Adam"
        samples = int(params["samples"])
        assert (backend == "async" and samples == 1200) or 1050 < samples < 1350
        # every worker's steps summed: what plain Keras counts
        per_epoch = sum(math.ceil(int(n) / 32) for n in params["partition_rows"][1:-1].split(","))
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert _steps(run.info.run_id, key) == [per_epoch, 2 * per_epoch], (backend, key)
        assert run.data.metrics["samples_per_second"] > 0
        assert run.data.metrics["exchanges"] > 0
        # the logged model, served by MLflow's own Spark UDF (one job for both models below)
        served[backend] = mlflow.pyfunc.spark_udf(
            spark,
            f"runs:/{run.info.run_id}/model",
            result_type="array<float>",
            env_manager="local",
        )("features")
    history = mlflow.MlflowClient().get_metric_history(
        runs["kerasonspark-async"].info.run_id, "val_accuracy"
    )
    logged = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert np.allclose(logged, result.history["val_accuracy"])
    assert runs["kerasonspark-async"].data.metrics["exchanges"] == result.stats["exchanges"]
    assert "staleness_median" in runs["kerasonspark-async"].data.metrics
    rows = (
        fitted.transform(held_out.limit(64))
        .select("probability", *(column.alias(name) for name, column in served.items()))
        .collect()
    )
    # sync's served model predicts what KerasModel.transform does, async's what the trainer does
    np.testing.assert_allclose(
        [list(r.sync) for r in rows], [r.probability.toArray() for r in rows], atol=1e-5
    )
    features = np.array([r.features for r in held_out.limit(64).collect()], np.float32)
    np.testing.assert_allclose(
        [list(r["async"]) for r in rows], trainer.model.predict(features, verbose=0), atol=1e-5
    )


def test_compare_leaves_a_parent_run_with_a_nested_run_per_strategy(spark, tracking_uri):
    x, y = make_blobs(1200)
    from kerasonspark import numpy_to_dataframe

    train_df = numpy_to_dataframe(spark, x[:800], y[:800])
    test_df = numpy_to_dataframe(spark, x[800:], y[800:])
    rows = compare_strategies(
        small_model,
        spark,
        train_df,
        test_df,
        ["sync", "single"],
        tracking=MlflowConfig(log_model=False),
    )
    runs = {run.info.run_name: run for run in _runs()}
    parent = runs.pop("kerasonspark-compare")
    assert sorted(runs) == ["single run 1", "sync run 1"]
    for run in runs.values():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.metrics["test_accuracy"] > 0.9 and "loss" in run.data.metrics
    assert parent.data.params["strategies"] == "['sync', 'single']"
    for row in rows:
        assert parent.data.metrics[f"{row.label}/test_accuracy"] == row.median("test_accuracy")


def test_mlflow_callback_logs_at_real_global_steps_and_off_means_off(spark, tracking_uri):
    from mlflow.keras import MlflowCallback

    # enough steps that progress reports (about one a second) land inside each epoch
    x, y = make_blobs(8000)
    trainer = SparkTrainer(
        small_model(),
        backend="sync",
        num_workers=2,
        epochs=2,
        batch_size=16,
        spark=spark,
        verbose=0,
        tracking=MlflowConfig(enabled=False),
    )
    with mlflow.start_run(run_name="mine") as run:
        trainer.fit(x, y, callbacks=[MlflowCallback(log_every_epoch=False, log_every_n_steps=1)])
    (only,) = _runs()  # fit logged nothing of its own
    assert only.info.run_id == run.info.run_id and "backend" not in only.data.params
    steps = _steps(run.info.run_id, "loss")
    total = 2 * 2 * math.ceil(4000 / 16)
    assert steps and steps == sorted(steps) and 0 < steps[0] and steps[-1] <= total


def test_tracking_settings_are_checked():
    with pytest.raises(ConfigurationError, match="enabled"):
        MlflowConfig(enabled="yes")
    with pytest.raises(ConfigurationError, match="MlflowConfig"):
        SparkTrainer(small_model(), tracking={"enabled": True})
    assert not tracking_enabled(MlflowConfig(enabled=False))
    assert tracking_enabled(MlflowConfig(enabled=True))
