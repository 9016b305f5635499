"""A run survives a lost worker: the training stage runs again from the parameter server's center,
each worker resuming at its place in its epoch's order; a repeated error ends `fit` at once.

End to end on local[2] with real Spark: a worker raises, or its Python process dies, once.
"""

from __future__ import annotations

import math
import time

import pytest

from kerasonspark import FailureConfig, SparkTrainer, WorkerError

from conftest import CrashingExchange, FailsOnce, crashing, make_blobs, small_model

pytestmark = pytest.mark.spark


def _data():
    x, y = make_blobs(1300)
    return (x[:1000], y[:1000]), (x[1000:], y[1000:])


@pytest.mark.parametrize(
    "backend,options",
    # hogwild restarts as async does: the same exchange, the server's lock aside
    [
        ("sync", {"sync_every": 4, "center": "driver"}),
        # the lost worker's shard comes back from the driver's mirror, 2 rounds old at most
        ("sync", {"sync_every": 4, "center": "sharded", "mirror_every": 2}),
        ("async", {"window": 4}),
        ("async", {"window": 4, "center": "sharded"}),
    ],
)
def test_a_worker_that_raises_once_costs_one_restart_and_no_exchange_twice(
    spark, tmp_path, backend, options, no_leaked_threads
):
    (x, y), validation = _data()
    engine = crashing(
        backend, lambda inner: FailsOnce(inner, 1, 6, str(tmp_path / "failed")), **options
    )
    trainer = SparkTrainer(
        small_model(),
        backend=engine,
        num_workers=2,
        epochs=2,
        batch_size=16,
        seed=0,
        spark=spark,
        verbose=0,
    )
    result = trainer.fit((x, y), validation_data=validation)
    stats = result.stats
    assert stats["restarts"] == 1
    log = stats["restart_log"][0]
    assert log["worker"] == 1 and "flaky disk" in log["cause"] and log["epoch"] == 0
    # The failing worker trained its 6th run before it failed; that run never reached the center.
    assert stats["lost_steps"] >= 4 and stats["redone_steps"] == stats["lost_steps"]
    # Every worker resumed right after its last applied exchange: no exchange applied twice, none
    # skipped.
    steps = [math.ceil(500 / 16)] * 2
    if backend == "sync":
        assert stats["exchanges"] == 2 * stats[backend]["rounds_per_epoch"]
    else:
        assert stats["exchanges"] == sum(2 * math.ceil(s / 4) for s in steps)
    assert len(result.history["val_accuracy"]) == 2 and result.history["val_accuracy"][-1] > 0.9


def test_a_worker_process_that_dies_once_is_restarted(spark, tmp_path, no_leaked_threads):
    (x, y), _ = _data()
    engine = crashing(
        "sync",
        lambda inner: FailsOnce(inner, 0, 3, str(tmp_path / "died"), kill=True),
        sync_every=4,
    )
    result = SparkTrainer(
        small_model(),
        backend=engine,
        num_workers=2,
        epochs=2,
        batch_size=16,
        seed=0,
        spark=spark,
        verbose=0,
    ).fit((x, y))
    assert (
        result.stats["restarts"] == 1
        and "exited unexpectedly" in result.stats["restart_log"][0]["cause"]
    )
    assert result.stats["exchanges"] == 2 * result.stats["sync"]["rounds_per_epoch"]
    assert result.history["accuracy"][-1] > 0.9


def test_the_same_error_twice_ends_fit_without_burning_the_other_restarts(spark, no_leaked_threads):
    (x, y), _ = _data()
    engine = crashing(
        "async", lambda inner: CrashingExchange(inner, 0, 3, ValueError("bad row 17")), window=4
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
            failure=FailureConfig(max_restarts=5),
        ).fit((x, y))
    message = str(failure.value)
    assert failure.value.worker == 0 and "bad row 17" in message
    assert "same error as before the last restart" in message and "1 restart(s) made" in message
    assert time.monotonic() - started < 90


def test_max_restarts_zero_fails_at_once_with_the_original_error(
    spark, tmp_path, no_leaked_threads
):
    (x, y), _ = _data()
    engine = crashing(
        "sync", lambda inner: FailsOnce(inner, 1, 2, str(tmp_path / "failed")), sync_every=4
    )
    with pytest.raises(WorkerError) as failure:
        SparkTrainer(
            small_model(),
            backend=engine,
            num_workers=2,
            epochs=2,
            batch_size=16,
            spark=spark,
            verbose=0,
            failure=FailureConfig(max_restarts=0),
        ).fit((x, y))
    assert (
        failure.value.worker == 1
        and "flaky disk" in str(failure.value)
        and "restart" not in str(failure.value)
    )


def test_max_restarts_is_checked():
    from kerasonspark import ConfigurationError

    with pytest.raises(ConfigurationError, match="max_restarts"):
        FailureConfig(max_restarts=-1)
