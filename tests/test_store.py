"""The store's logic without HTTP."""

import threading
import time

import numpy as np
import pytest

from kerasonspark import BarrierTimeoutError, WireFormatError
from kerasonspark.parameter_server import ParameterStore


def run_round(store, contributions):
    results = {}

    def join(worker, weights, samples):
        results[worker] = store.barrier(0, worker, weights, samples)

    threads = [
        threading.Thread(target=join, args=(w, np.asarray(v, np.float32), n))
        for w, (v, n) in enumerate(contributions)
    ]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    return results


def test_weighted_average_ignores_workers_without_samples():
    store = ParameterStore(np.zeros(2, np.float32), [(2,)], num_workers=3)
    results = run_round(store, [([1, 2], 1), ([3, 6], 3), ([100, 100], 0)])
    np.testing.assert_allclose(results[0], [(1 + 9) / 4, (2 + 18) / 4])
    assert store.stats()["rounds"] == 1 and store.version == 1


def test_round_with_no_samples_keeps_the_center():
    store = ParameterStore(np.array([5, 5], np.float32), [(2,)], num_workers=2)
    results = run_round(store, [([1, 1], 0), ([2, 2], 0)])
    np.testing.assert_array_equal(results[1], [5, 5])


def test_reported_failure_fails_the_open_round_at_once():
    store = ParameterStore(np.zeros(2, np.float32), [(2,)], num_workers=2, barrier_timeout=60)
    errors = []

    def wait():
        try:
            store.barrier(0, 0, np.ones(2, np.float32), 1)
        except BarrierTimeoutError as exc:
            errors.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    assert store.wait_for_arrivals(0, 1, timeout=10) == [0]
    store.report_failure(1, "boom")
    t.join(5)
    assert errors and "worker 1 failed" in str(errors[0])
    assert store.stats()["failures"] == {"1": "boom"}


def test_check_update_refuses_nan_and_wrong_shapes():
    store = ParameterStore(np.zeros(4, np.float32), [(2, 2)], num_workers=1)
    with pytest.raises(WireFormatError, match="NaN"):
        store.check_update([(2, 2)], np.array([0, np.inf, 0, 0], np.float32))
    with pytest.raises(WireFormatError, match="shapes"):
        store.check_update([(4,)], np.zeros(4, np.float32))


def test_staleness_summary_is_exact_and_bounded():
    from collections import Counter

    from kerasonspark.parameter_server._store import staleness_summary

    assert staleness_summary(Counter({0: 1, 1: 5, 4: 1})) == {
        "min": 0,
        "median": 1,
        "max": 4,
        "histogram": {"0": 1, "1": 5, "4": 1},
    }
    # the upper median, as sorted(list)[n // 2]
    assert staleness_summary(Counter({2: 1, 7: 1}))["median"] == 7
    assert staleness_summary(Counter())["max"] == 0


def test_a_round_opened_after_a_failure_report_fails_at_once():
    store = ParameterStore(np.zeros(2, np.float32), [(2,)], num_workers=2, barrier_timeout=60)
    store.report_failure(1, "boom")
    started = time.monotonic()
    with pytest.raises(BarrierTimeoutError, match="worker\\(s\\) \\[1\\] failed"):
        store.barrier(3, 0, np.ones(2, np.float32), 1)
    assert time.monotonic() - started < 5
