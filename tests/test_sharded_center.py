"""A sharded center for ``sync``: shard layout, the driver's mirror and directory, and the real
engine with its workers serving their shards (threads here; Spark in test_restarts)."""

import math
import threading
import time

import numpy as np
import pytest

from kerasonspark import BarrierTimeoutError, ParameterServerError, WireFormatError
from kerasonspark.parameter_server import (
    ParameterClient,
    ParameterServer,
    ParameterStore,
    ServerConfig,
    new_secret,
    wire,
)
from kerasonspark.parameter_server._store import shard_bounds
from kerasonspark.testing import fit_in_process

from conftest import FailsOnce, crashing, make_blobs, small_model


@pytest.mark.parametrize("size,parts", [(10, 3), (7, 7), (3, 5), (1_048_853, 4)])
def test_shards_cover_the_weights_once_in_order(size, parts):
    bounds = shard_bounds(size, parts)
    assert len(bounds) == parts and bounds[0][0] == 0 and bounds[-1][1] == size
    assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:], strict=False))
    lengths = [stop - start for start, stop in bounds]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == [len(a) for a in np.array_split(np.arange(size), parts)]


def test_the_mirror_makes_the_center_only_from_every_shard_of_one_key():
    store = ParameterStore(np.zeros(10, np.float32), [(5, 2)], num_workers=3)
    bounds = shard_bounds(10, 3)  # 4, 3, 3 elements
    shard = {w: np.full(b - a, w + 1, np.float32) for w, (a, b) in enumerate(bounds)}
    assert not store.mirror(0, 4, 0, shard[0], 4) and not store.mirror(1, 4, 4, shard[1], 4)
    np.testing.assert_array_equal(store.center, np.zeros(10))  # not every shard: unchanged
    with pytest.raises(WireFormatError, match="owns elements 7 to 10"):
        store.mirror(2, 4, 6, shard[2], 4)  # not where worker 2's shard starts
    with pytest.raises(WireFormatError, match="owns elements 7 to 10"):
        store.mirror(2, 4, 7, np.ones(4, np.float32), 4)  # longer than the shard
    with pytest.raises(WireFormatError, match="NaN or Inf") as nan:
        store.mirror(2, 4, 7, np.array([1, np.nan, 1], np.float32), 4)
    assert nan.value.status == 422
    with pytest.raises(ParameterServerError, match=r"\[0, 3\)"):
        store.mirror(3, 4, 10, shard[2], 4)
    np.testing.assert_array_equal(store.center, np.zeros(10))
    assert store.mirror(2, 4, 7, shard[2], 4)
    np.testing.assert_array_equal(store.center, [1, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    assert store.applied_exchanges(0) == 4 and store.stats()["mirrors"] == 1
    with pytest.raises(ParameterServerError, match="not newer") as stale:
        store.mirror(0, 3, 0, shard[0], 3)
    assert stale.value.status == 409
    # A restarted stage counts from what the earlier ones held.
    store.reopen()
    for worker, (start, _) in enumerate(bounds):
        store.mirror(worker, 2, start, shard[worker] * 0, 2)
    assert store.applied_exchanges(1) == 6 and not store.center.any()
    assert store.stats()["refused"] == {"shape": 2, "nonfinite": 1}


def test_a_mirror_of_pushes_holds_what_every_shard_holds():
    store = ParameterStore(np.zeros(4, np.float32), [(4,)], num_workers=2)
    store.mirror(0, 1, 0, np.ones(2, np.float32), 0, {0: 5, 1: 3})
    # shard 1 holds one push of worker 0 less: the center holds that push only partly
    assert store.mirror(1, 1, 2, np.ones(2, np.float32), 0, {0: 4, 1: 3})
    assert [store.applied_exchanges(w) for w in (0, 1)] == [4, 3]
    assert store.stats()["updates"] == 7 and store.stats()["rounds"] == 0
    store.reopen()
    store.mirror(0, 1, 0, np.ones(2, np.float32), 0, {0: 2})
    store.mirror(1, 1, 2, np.ones(2, np.float32), 0, {0: 2, 1: 1})
    assert [store.applied_exchanges(w) for w in (0, 1)] == [6, 3]  # worker 1: min(0, 1) more


def test_a_fence_waits_for_every_worker_and_for_no_failed_one():
    store = ParameterStore(np.zeros(2, np.float32), [(2,)], num_workers=3, barrier_timeout=5)
    store.fence(0, 1, wait=False)
    store.fence(0, 2, wait=False)
    store.fence(0, 0, wait=True)  # all three arrived: returns at once
    with pytest.raises(BarrierTimeoutError, match=r"timed out waiting for worker\(s\) \[1, 2\]"):
        store.fence(1, 0, wait=True, timeout=0.2)
    store.report_failure(2, "gone")
    with pytest.raises(BarrierTimeoutError, match=r"worker\(s\) \[2\] failed"):
        store.fence(1, 0, wait=True)


def test_the_directory_answers_once_every_worker_published_and_refuses_bad_addresses(
    no_leaked_threads,
):
    secret = new_secret()
    store = ParameterStore(np.zeros(4, np.float32), [(4,)], num_workers=2, barrier_timeout=5)
    with ParameterServer(store, ServerConfig(secret, max_payload_bytes=4096)) as server:
        answers: dict[int, list[str]] = {}

        def publish(worker: int) -> None:
            with ParameterClient(server.url, secret, worker, timeout=30) as client:
                answers[worker] = client.publish_shard(f"http://127.0.0.1:{4000 + worker}")

        threads = [threading.Thread(target=publish, args=(w,)) for w in (1, 0)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert answers[0] == answers[1] == ["http://127.0.0.1:4000", "http://127.0.0.1:4001"]
        with ParameterClient(server.url, secret, 0, timeout=30) as client:
            for url in ["ftp://h:1", "http://nohost", "http://h:99999", "x" * 300, 7]:
                with pytest.raises(ParameterServerError, match="must be http://host:port") as bad:
                    client.post_json("/v1/shards", {"url": url})
                assert bad.value.status == 400
            with pytest.raises(ParameterServerError, match="already published") as twice:
                client.publish_shard("http://127.0.0.1:4000")
            assert twice.value.status == 409
            with pytest.raises(ParameterServerError, match="owns elements 0 to 2") as wrong:
                client.mirror(1, np.ones(3, np.float32), 0, rounds=1)
            assert wrong.value.status == 400
            assert not client.mirror(1, np.ones(2, np.float32), 0, rounds=1, pushes={0: 2})
            for pushes in [[1], {"x": 1}, {"0": -1}]:
                status, _, _ = client.request(
                    "POST",
                    "/v1/center/2",
                    wire.encode(np.ones(2, np.float32), [(2,)], offset=0, pushes=pushes),
                )
                assert status == 400
        np.testing.assert_array_equal(store.center, np.zeros(4))
    alone = ParameterStore(np.zeros(4, np.float32), [(4,)], num_workers=2)
    with pytest.raises(BarrierTimeoutError, match=r"Worker\(s\) \[1\] did not publish"):
        alone.publish_shard(0, "http://127.0.0.1:4000", timeout=0.2)


def _weights(model) -> np.ndarray:
    return np.concatenate([w.ravel() for w in model.get_weights()])


@pytest.mark.inprocess
def test_a_sharded_center_averages_as_the_driver_does_without_the_driver_carrying_rounds(
    no_leaked_threads,
):
    x, y = make_blobs(1200)
    results = {
        center: fit_in_process(
            "sync",
            small_model(),
            x,
            y,
            epochs=1,
            batch_size=16,
            num_workers=3,
            seed=0,
            backend_options={"sync_every": 4, "outer_momentum": 0.5, "center": center},
            validation_data=make_blobs(200, seed=0),
        )
        for center in ("driver", "sharded")
    }
    driver, sharded = results["driver"], results["sharded"]
    # The same arithmetic, summed in another order: equal within float32 summation error.
    np.testing.assert_allclose(_weights(sharded.model), _weights(driver.model), atol=1e-5)
    assert sharded.history["val_accuracy"][-1] > 0.9
    assert sharded.stats["sync"]["center"] == "sharded"
    assert driver.stats["sync"]["center"] == "driver"
    rounds = math.ceil(math.ceil(400 / 16) / 4)
    assert sharded.stats["exchanges"] == driver.stats["exchanges"] == rounds
    for worker in sharded.stats["workers"]:
        assert worker["rounds"] == rounds
        # each round: a third of the model to each of 2 peers, and back
        assert worker["peer_mb_sent"] > 0 and worker["shard_mb_in"] > 0
    # The driver carried the epoch's center once, not 3 models in and out every round.
    hosted, mirrored = driver.stats["parameter_server"], sharded.stats["parameter_server"]
    assert mirrored["mirrors"] == 1 and mirrored["rounds"] == rounds
    assert mirrored["mb_in"] < hosted["mb_in"] / 4


@pytest.mark.inprocess
@pytest.mark.parametrize(
    "backend,options,failing_exchange,resumed",
    [
        # fails in round 6: every worker resumes after round 4, the last mirror
        ("sync", {"sync_every": 4, "mirror_every": 2}, 6, 4),
        # fails at its 10th window, the 4th of epoch 1 (6 windows an epoch): every worker resumes
        # after epoch 0's 6 pushes, the last mirror
        ("async", {"window": 4}, 10, 6),
    ],
)
def test_a_lost_worker_resumes_from_the_last_mirror(
    backend, options, failing_exchange, resumed, tmp_path, no_leaked_threads
):
    engine = crashing(
        backend,
        lambda inner: FailsOnce(inner, 1, failing_exchange, str(tmp_path / "failed")),
        center="sharded",
        **options,
    )
    x, y = make_blobs(1300)
    result = fit_in_process(
        engine,
        small_model(),
        x[:1000],
        y[:1000],
        epochs=2,
        batch_size=16,
        num_workers=3,
        seed=0,
        validation_data=(x[1000:], y[1000:]),
    )
    stats = result.stats
    assert stats["restarts"] == 1 and "flaky disk" in stats["restart_log"][0]["cause"]
    assert stats["restart_log"][0]["resume_exchanges"] == {0: resumed, 1: resumed, 2: resumed}
    assert 0 < stats["lost_steps"]
    if backend == "sync":
        assert stats["lost_steps"] <= 3 * 2 * 4  # at most one interval of rounds, each worker
        assert stats["exchanges"] == 2 * stats["sync"]["rounds_per_epoch"]
    else:
        assert stats["exchanges"] == 3 * 2 * 6
    assert result.history["val_accuracy"][-1] > 0.9
    assert not [t for t in threading.enumerate() if t.name.startswith("kerasonspark-shard")]


def test_a_peer_that_is_gone_fails_the_round_at_once_not_at_the_timeout(no_leaked_threads):
    from kerasonspark.parameter_server._shards import ShardedCenter

    secret, weights = new_secret(), np.arange(6, dtype=np.float32)
    driver_store = ParameterStore(weights, [(6,)], num_workers=2, barrier_timeout=60)
    with ParameterServer(driver_store, ServerConfig(secret, max_payload_bytes=4096)) as driver:
        centers: dict[int, ShardedCenter] = {}

        def join(worker: int) -> None:
            client = ParameterClient(driver.url, secret, worker, timeout=30)
            centers[worker] = ShardedCenter(
                client,
                secret,
                worker,
                2,
                weights,
                barrier_timeout=60,
                timeout=30,
                timeout_name="timeout",
            )

        threads = [threading.Thread(target=join, args=(w,)) for w in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # one round together: each gets the average of both, shard by shard
        averages: dict[int, np.ndarray] = {}
        rounds = [
            threading.Thread(
                target=lambda w: averages.__setitem__(
                    w, centers[w].round(0, weights + 10 * w, samples=1 + w)
                ),
                args=(w,),
            )
            for w in (0, 1)
        ]
        for thread in rounds:
            thread.start()
        for thread in rounds:
            thread.join()
        np.testing.assert_allclose(averages[0], weights + 10 * 2 / 3, rtol=1e-6)
        np.testing.assert_array_equal(averages[0], averages[1])
        centers[1].close()  # worker 1's task is gone, its shard server with it
        started = time.monotonic()
        with pytest.raises(ParameterServerError, match="Cannot reach|Lost the connection"):
            centers[0].round(1, weights, samples=1)
        assert time.monotonic() - started < 10
        centers[0].close()
        for center in centers.values():
            center.driver.close()


@pytest.mark.inprocess
@pytest.mark.parametrize(
    "backend,options",
    [
        ("async", {}),
        ("hogwild", {}),
        # each push travels in the background while the next window trains
        ("async", {"overlap": True}),
    ],
)
def test_the_asynchronous_engines_push_shard_by_shard(backend, options, no_leaked_threads):
    x, y = make_blobs(1200)
    result = fit_in_process(
        backend,
        small_model(),
        x,
        y,
        epochs=2,
        batch_size=16,
        num_workers=3,
        seed=0,
        backend_options={"window": 4, "center": "sharded", **options},
        validation_data=make_blobs(200, seed=0),
    )
    stats = result.stats
    assert result.history["val_accuracy"][-1] > 0.9 and stats[backend]["center"] == "sharded"
    pushes = 2 * math.ceil(math.ceil(400 / 16) / 4)  # 7 windows an epoch, each worker
    assert [w["pushes"] for w in stats["workers"]] == [pushes] * 3
    # the driver holds every push through the epochs' mirrors, and carried none of them
    server = stats["parameter_server"]
    assert stats["exchanges"] == server["updates"] == 3 * pushes and server["mirrors"] == 2
    assert server["mb_in"] < 3 * pushes * 0.01  # 0.003 MB a push of this model, 3 workers
    for worker in stats["workers"]:
        assert sum(worker["shard"]["staleness"]["histogram"].values()) == 3 * pushes
        assert worker["shard"]["refused_total"] == 0 and worker["peer_mb_sent"] > 0
