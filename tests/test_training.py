"""End to end: real Spark (local[2]), real TensorFlow training, a real parameter server."""

import time

import numpy as np
import pytest

from kerasonspark import SparkTrainer, WorkerError, available_backends, numpy_to_dataframe
from kerasonspark._serialization import get_flat_weights

from conftest import CrashingExchange, crashing, make_blobs, small_model

pytestmark = pytest.mark.spark

FLOOR = 0.9  # an untrained 4-class model scores about 0.25


COMMON_STATS = {
    "backend",
    "samples",
    "epochs",
    "num_workers",
    "train_seconds",
    "wall_seconds",
    "prepare_seconds",
    "samples_per_second",
    "exchanges",
    "workers",
}


@pytest.mark.parametrize("backend", sorted(available_backends()))
def test_every_installed_engine_keeps_the_trainer_contract(spark, backend, no_leaked_threads):
    """Same call, same result fields, whatever the engine: scripts compare strategies by one
    string."""
    data, labels = make_blobs(1000)
    (x, y), (xv, yv) = (data[:800], labels[:800]), (data[800:], labels[800:])
    model = small_model()
    before = get_flat_weights(model)
    result = SparkTrainer(
        model,
        backend=backend,
        num_workers=2,
        epochs=2,
        batch_size=16,
        spark=spark,
        seed=1,
        verbose=0,
    ).fit(x, y, validation_data=(xv, yv))
    assert result.model is model and not np.allclose(get_flat_weights(model), before)
    assert set(result.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(values) == 2 for values in result.history.values())
    assert result.history["val_accuracy"][-1] > FLOOR
    assert COMMON_STATS <= set(result.stats) and result.stats["backend"] == backend
    assert isinstance(result.stats[backend], dict)  # the engine's own figures, under its name
    assert (result.stats["exchanges"] == 0) == (backend == "single")
    assert (
        result.stats["samples"] == 2 * 800
        and sum(w["samples"] for w in result.stats["workers"]) == 800
    )
    if backend in ("async", "hogwild"):  # DynSGD at 2 workers' rate: no push counts more than half
        assert (
            result.stats[backend]["rule"] == "dynsgd"
            and result.stats[backend]["staleness_floor"] == 2.0
        )


@pytest.mark.parametrize("backend", ["sync"])
def test_engine_trains_above_the_floor_from_a_dataframe(spark, backend, no_leaked_threads):
    x, y = make_blobs(1200)
    xv, yv = make_blobs(400, seed=0)[0][:400], make_blobs(400, seed=0)[1][:400]
    model = small_model()
    before = get_flat_weights(model)
    trainer = SparkTrainer(
        model,
        backend=backend,
        num_workers=2,
        epochs=2,
        batch_size=16,
        spark=spark,
        seed=1,
        verbose=0,
        backend_options={"sync_every": 8} if backend == "sync" else None,
    )
    result = trainer.fit(
        numpy_to_dataframe(spark, x, y), validation_data=numpy_to_dataframe(spark, xv, yv)
    )
    assert result.model is model
    assert not np.allclose(get_flat_weights(model), before)
    assert (
        len(result.history["loss"]) == 2 and result.history["loss"][1] < result.history["loss"][0]
    )
    assert result.history["val_accuracy"][-1] > FLOOR
    assert trainer.evaluate(numpy_to_dataframe(spark, xv, yv))["accuracy"] > FLOOR
    stats = result.stats
    assert (
        stats["samples"] == 2400 and stats["samples_per_second"] > 0 and stats["wall_seconds"] > 0
    )
    assert sum(w["samples"] for w in stats["workers"]) == 1200
    # small partitions stay in memory under "auto"
    assert stats["partition_storage"]["path"] == "memory"
    if backend == "sync":
        # 600 rows a worker: ceil(600 / 16) = 38 steps, in ceil(38 / 8) = 5 rounds an epoch
        assert stats["sync"]["rounds_per_epoch"] == 5 and stats["exchanges"] == 2 * 5
        assert len(stats["workers"]) == 2 and all(
            w["rounds"] == stats["exchanges"] for w in stats["workers"]
        )


def test_sync_trains_from_numpy_rdd_and_one_hot_labels(spark):
    import keras

    x, y = make_blobs(800)
    model = small_model(loss="categorical_crossentropy")
    rdd = spark.sparkContext.parallelize(
        [(row, int(label)) for row, label in zip(x.tolist(), y, strict=True)], 3
    )
    trainer = SparkTrainer(
        model,
        backend="sync",
        num_workers=2,
        epochs=2,
        batch_size=16,
        spark=spark,
        seed=0,
        verbose=0,
    )
    trainer.fit(rdd)
    scores = trainer.evaluate((x, keras.utils.to_categorical(y, 4)))
    assert scores["accuracy"] > FLOOR


def test_vector_features_and_empty_partition(spark):
    from pyspark.ml.linalg import Vectors

    x, y = make_blobs(600)
    rows = [(Vectors.dense(r), float(label)) for r, label in zip(x.tolist(), y, strict=True)]
    # Two partitions, one of them empty: that worker only joins the rounds.
    two_parts = spark.sparkContext.parallelize(rows, 2).mapPartitionsWithIndex(
        lambda i, it: it if i == 0 else iter([])
    )
    # Cached, so fit and evaluate read the partitions instead of running the Python rows again.
    df = spark.createDataFrame(two_parts, ["features", "label"]).cache()
    assert df.rdd.getNumPartitions() == 2 and df.count() == 300
    trainer = SparkTrainer(
        small_model(),
        backend="sync",
        num_workers=2,
        epochs=3,
        batch_size=16,
        spark=spark,
        seed=0,
        verbose=0,
    )
    result = trainer.fit(df)
    counts = sorted(w["samples"] for w in result.stats["workers"])
    assert counts == [0, 300]
    assert trainer.evaluate(df)["accuracy"] > FLOOR
    df.unpersist()


def test_predict_keeps_columns_and_runs_on_executors(spark):
    x, y = make_blobs(300)
    model = small_model()
    model.fit(x, y, epochs=5, verbose=0)
    trainer = SparkTrainer(model, spark=spark, verbose=0)
    from pyspark.sql import functions as F

    df = numpy_to_dataframe(spark, x, y).withColumn("row", F.monotonically_increasing_id())
    out = trainer.predict(df).orderBy("row").collect()
    assert len(out) == 300 and set(out[0].asDict()) == {"features", "label", "row", "prediction"}
    predicted = np.array([r.prediction for r in out])
    np.testing.assert_allclose(predicted, model.predict(x, verbose=0), atol=1e-5)
    from_numpy = trainer.predict(x[:10]).collect()
    assert len(from_numpy) == 10 and len(from_numpy[0].prediction) == 4


def test_a_failing_worker_fails_fit_quickly_and_names_itself(spark, no_leaked_threads):
    x, y = make_blobs(800)
    engine = crashing(
        "sync",
        lambda inner: CrashingExchange(inner, 1, 3, RuntimeError("simulated worker crash")),
        sync_every=4,
        barrier_timeout=120,
    )
    trainer = SparkTrainer(
        small_model(),
        backend=engine,
        num_workers=2,
        epochs=2,
        batch_size=16,
        spark=spark,
        verbose=0,
    )
    started = time.monotonic()
    with pytest.raises(WorkerError) as failure:
        trainer.fit((x, y))
    assert failure.value.worker == 1
    assert "simulated worker crash" in str(failure.value)
    assert time.monotonic() - started < 90  # well under the 120 s barrier timeout


def test_async_worker_failure_stops_everything_and_names_the_worker(spark, no_leaked_threads):
    x, y = make_blobs(800)
    engine = crashing(
        "async",
        lambda inner: CrashingExchange(inner, 0, 4, ValueError("worker 0 lost its disk")),
        window=2,
    )
    started = time.monotonic()
    with pytest.raises(WorkerError) as failure:
        SparkTrainer(
            small_model(),
            backend=engine,
            num_workers=2,
            epochs=2,
            batch_size=16,
            spark=spark,
            verbose=0,
        ).fit((x, y))
    assert failure.value.worker == 0 and "lost its disk" in str(failure.value)
    assert time.monotonic() - started < 60


def test_regression_targets_train_with_sync(spark):
    import keras

    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 6)).astype(np.float32)
    y = (x @ rng.normal(size=6)).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(0.05), "mse")
    baseline = float(np.mean(y**2))
    trainer = SparkTrainer(
        model,
        backend="sync",
        num_workers=2,
        epochs=4,
        batch_size=16,
        spark=spark,
        seed=0,
        verbose=0,
    )
    result = trainer.fit(numpy_to_dataframe(spark, x, y))
    assert result.history["loss"][-1] < 0.1 * baseline
    assert trainer.evaluate((x, y))["loss"] < 0.1 * baseline


def test_regression_targets_of_the_wrong_size_are_refused(spark):
    import keras

    from kerasonspark import DataError

    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
    model.compile("adam", "mse")
    x = np.zeros((50, 6), np.float32)
    with pytest.raises(DataError, match="2 value\\(s\\) each"):
        SparkTrainer(model, spark=spark, verbose=0).fit((x, np.zeros((50, 3), np.float32)))


# Last: it kills a Python worker, and every later test would pay for a fresh one (TensorFlow's
# import).
def test_a_worker_process_that_dies_fails_fit_without_waiting_for_the_barrier_timeout(
    spark, no_leaked_threads
):
    import os

    class Dying(CrashingExchange):
        def exchange(self, model, samples):
            self.calls += 1
            if self.me == self.worker and self.calls == self.at:
                os._exit(3)  # no traceback, no failure report: the process is simply gone
            self.inner.exchange(model, samples)

    x, y = make_blobs(800)
    started = time.monotonic()
    with pytest.raises(WorkerError) as failure:
        SparkTrainer(
            small_model(),
            backend=crashing(
                "sync", lambda inner: Dying(inner, 0, 2, None), sync_every=4, barrier_timeout=120
            ),
            num_workers=2,
            epochs=2,
            batch_size=16,
            spark=spark,
            verbose=0,
        ).fit((x, y))
    assert failure.value.worker == 0 and "exited unexpectedly" in str(failure.value)
    assert time.monotonic() - started < 90  # Spark notices the lost task; nobody waits 120 s


@pytest.mark.parametrize(
    "backend, options",
    [
        ("sync", {"sync_every": 8, "outer_momentum": 0.5, "outer_lr": 0.8, "warmup_steps": 10}),
        ("async", {"rule": "sasgd", "window": 4, "warmup_steps": 10}),
    ],
)
def test_non_default_optimisation_options_train_and_the_scale_reaches_the_workers(
    spark, backend, options
):
    data, labels = make_blobs(1300)
    (x, y), (xv, yv) = (data[:1000], labels[:1000]), (data[1000:], labels[1000:])

    def fit(**scaling):
        model = small_model()
        before = get_flat_weights(model)
        result = SparkTrainer(
            model,
            backend=backend,
            num_workers=2,
            epochs=2,
            batch_size=16,
            spark=spark,
            seed=1,
            verbose=0,
            backend_options={**options, **scaling},
        ).fit(x, y, validation_data=(xv, yv))
        return result, np.abs(get_flat_weights(model) - before).max()

    result, moved = fit(lr_scale="linear")
    assert result.history["val_accuracy"][-1] > FLOOR and result.stats[backend]["lr_scale"] == 2.0
    # A tiny multiplier from the first step (no warm-up) leaves the weights almost where they
    # were: the workers applied it.
    frozen, barely = fit(lr_scale=1e-6, warmup_steps=0)
    assert frozen.stats[backend]["lr_scale"] == 1e-6 and barely < 1e-4 < moved


def test_a_model_larger_than_the_default_payload_cap_trains(spark):
    """The server's cap follows the model: a 70 MB model's rounds pass a default of 64 MiB."""
    import keras

    from kerasonspark.parameter_server import ServerConfig

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(4200, activation="relu"),
            keras.layers.Dense(4200, activation="relu"),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    assert model.count_params() * 4 > ServerConfig(b"s" * 32).max_payload_bytes
    data, labels = make_blobs(500)
    before = get_flat_weights(model)
    result = SparkTrainer(
        model, num_workers=2, epochs=1, batch_size=16, spark=spark, seed=1, verbose=0
    ).fit(data[:400], labels[:400], validation_data=(data[400:], labels[400:]))
    assert result.history["val_accuracy"][-1] > FLOOR and result.stats["exchanges"] > 1
    assert not np.allclose(get_flat_weights(model), before)
