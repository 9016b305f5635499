"""``balance_workers``: each epoch after the first, steps in proportion to each worker's measured
speed."""

import threading
import time

import numpy as np
import pytest

from kerasonspark import DataConfig
from kerasonspark._executor import LocalSteps, balanced_order
from kerasonspark._steering import balanced_steps
from kerasonspark.testing import fit_in_process

from conftest import make_blobs, small_model


def test_shares_follow_the_speeds_and_keep_the_epochs_steps():
    assert balanced_steps([640, 640], 32, [300.0, 100.0]) == [30, 10]
    assert balanced_steps([640, 640], 32, [100.0, 100.0]) == [20, 20]
    shares = balanced_steps([1000, 1000, 1000], 32, [5.0, 3.0, 1.0])  # 32 steps each: 96 in all
    assert sum(shares) == 96 and shares[0] > shares[1] > shares[2] and shares == [53, 32, 11]
    # A worker that measured nothing (an empty partition) keeps its own; one worker alone keeps its
    # own.
    assert balanced_steps([640, 0], 32, [300.0, None]) == [20, 0]
    assert balanced_steps([640, 640], 32, [300.0, None]) == [20, 20]
    # However slow, a worker trains at least one step.
    assert balanced_steps([640, 640], 32, [1e6, 1.0]) == [39, 1]


def test_a_balanced_order_is_a_part_of_the_partition_or_all_of_it_and_more():
    rng = np.random.default_rng(0)
    order = rng.permutation(10)
    assert list(balanced_order(order, 4, rng)) == list(order[:4])
    longer = balanced_order(order, 25, rng)
    assert len(longer) == 25 and list(longer[:10]) == list(order)
    assert sorted(longer[10:20]) == list(range(10))  # then a fresh permutation: every row once more


def test_a_slow_worker_gets_fewer_steps_and_the_epoch_keeps_its_size(monkeypatch):
    run = LocalSteps.run

    def slow_for_worker_1(self, x, y, index, batch, weights, max_rows=None):
        if threading.current_thread().name == "kerasonspark-worker-1":
            # a host a few times slower than the other, per step
            time.sleep(0.01 * len(index) / batch)
        return run(self, x, y, index, batch, weights, max_rows)

    monkeypatch.setattr(LocalSteps, "run", slow_for_worker_1)
    x, y = make_blobs(1280)
    result = fit_in_process(
        "sync",
        small_model(),
        x,
        y,
        epochs=3,
        batch_size=32,
        seed=0,
        data=DataConfig(balance_workers=True),
        backend_options={"sync_every": 4},
    )
    shares = result.stats["epoch_events"]["balanced_steps"]
    assert len(shares) == 2  # decided at the end of epochs 1 and 2
    for fast, slow in shares:
        assert fast + slow == 40 and fast > 1.5 * slow  # 640 rows of 32 each: 20 steps a worker
    workers = sorted(result.stats["workers"], key=lambda w: w["worker"])
    assert [w["balanced_steps"] for w in workers] == [list(s) for s in zip(*shares, strict=True)]
    # what each trained is what it was given
    assert workers[0]["steps"] == 20 + shares[0][0] + shares[1][0]
    assert result.history["accuracy"][-1] > 0.9


def test_balance_workers_must_be_a_bool():
    from kerasonspark import ConfigurationError

    with pytest.raises(ConfigurationError, match="balance_workers"):
        DataConfig(balance_workers="yes")


@pytest.mark.spark
def test_balanced_workers_train_on_spark_and_report_their_shares(spark):
    from kerasonspark import SparkTrainer

    x, y = make_blobs(1280)
    trainer = SparkTrainer(
        small_model(),
        backend="async",
        num_workers=2,
        spark=spark,
        epochs=3,
        verbose=0,
        seed=0,
        data=DataConfig(balance_workers=True),
    )
    result = trainer.fit(x, y)
    shares = result.stats["epoch_events"]["balanced_steps"]
    assert len(shares) == 2 and all(sum(s) == 40 and min(s) >= 1 for s in shares)
    workers = sorted(result.stats["workers"], key=lambda w: w["worker"])
    assert [w["balanced_steps"] for w in workers] == [list(s) for s in zip(*shares, strict=True)]
    assert trainer.evaluate(x, y)["accuracy"] > 0.9
