"""Update rules on exact numbers."""

import threading

import numpy as np
import pytest

from kerasonspark.parameter_server import ParameterStore, make_rule
from kerasonspark.parameter_server._rules import (
    Adag,
    Downpour,
    DynSGD,
    ElasticAveraging,
    OuterNesterov,
    StalenessAware,
)

CENTER = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
DELTA = np.array([0.5, -1.0, 2.0, 0.0], np.float32)


def test_downpour_adds_the_delta():
    new, reply = Downpour().apply(CENTER, DELTA, staleness=3, window=5)
    np.testing.assert_array_equal(new, [1.5, 1.0, 5.0, 4.0])
    assert reply is new


def test_adag_divides_by_the_window():
    new, _ = Adag().apply(CENTER, DELTA, staleness=0, window=4)
    np.testing.assert_allclose(new, [1.125, 1.75, 3.5, 4.0])


@pytest.mark.parametrize("staleness, factor", [(0, 1.0), (1, 0.5), (3, 0.25)])
def test_dynsgd_divides_by_staleness_plus_one(staleness, factor):
    new, _ = DynSGD().apply(CENTER, DELTA, staleness=staleness, window=5)
    np.testing.assert_allclose(new, CENTER + factor * DELTA)


@pytest.mark.parametrize("staleness, factor", [(0, 0.5), (1, 0.5), (3, 0.25)])
def test_dynsgd_never_divides_by_less_than_its_floor(staleness, factor):
    new, _ = DynSGD(floor=2).apply(CENTER, DELTA, staleness=staleness, window=5)
    np.testing.assert_allclose(new, CENTER + factor * DELTA)


def test_dynsgd_refuses_a_floor_below_one():
    with pytest.raises(ValueError, match="floor"):
        DynSGD(floor=0.5)


def test_the_async_options_give_dynsgd_the_workers_rate_factor_as_its_floor():
    from kerasonspark._asynchronous import AsyncOptions

    rule = AsyncOptions().make_rule(4.0)
    assert isinstance(rule, DynSGD) and rule.scale(staleness=0, window=20) == 0.25
    assert DynSGD().scale(staleness=0, window=20) == 1.0  # lr_scale=1: the paper's rule, unchanged
    # the 2017 rule keeps its arithmetic
    assert isinstance(AsyncOptions(rule="adag").make_rule(4.0), Adag)


def test_elastic_averaging_moves_both_toward_each_other():
    worker = np.array([3.0, 2.0, 1.0, 4.0], np.float32)
    new, reply = ElasticAveraging(alpha=0.25).apply(CENTER, worker, staleness=0, window=5)
    elastic = 0.25 * (worker - CENTER)  # [0.5, 0, -0.5, 0]
    np.testing.assert_allclose(new, CENTER + elastic)
    np.testing.assert_allclose(reply, worker - elastic)


@pytest.mark.parametrize("staleness, factor", [(0, 1.0), (1, 1.0), (2, 0.5), (4, 0.25)])
def test_sasgd_divides_by_the_staleness_counting_one_update_between_as_fresh(staleness, factor):
    new, _ = StalenessAware().apply(CENTER, DELTA, staleness=staleness, window=5)
    np.testing.assert_allclose(new, CENTER + factor * DELTA)


def test_outer_nesterov_steps_the_center_with_momentum_on_the_rounds_averaged_change():
    outer = OuterNesterov(lr=0.5, momentum=0.5)
    first = CENTER + DELTA  # the round's average: g = center - average = -DELTA
    center = outer.step(CENTER, first.copy())
    # m = -DELTA; center -= 0.5 * (g + 0.5 m) = 0.5 * 1.5 * DELTA
    np.testing.assert_allclose(center, CENTER + 0.75 * DELTA)
    second = outer.step(center, center + DELTA)
    # m = 0.5 * -DELTA - DELTA = -1.5 DELTA; step = 0.5 * (DELTA + 0.75 DELTA)
    np.testing.assert_allclose(second, center + 0.875 * DELTA)
    average = CENTER + DELTA
    assert OuterNesterov().step(CENTER, average) is average  # lr 1, no momentum: plain averaging
    plain = OuterNesterov(lr=2.0, momentum=0.5, nesterov=False)
    np.testing.assert_allclose(plain.step(CENTER, CENTER + DELTA), CENTER + 2 * DELTA)
    with pytest.raises(ValueError, match="outer_momentum"):
        OuterNesterov(momentum=1.0)


def test_an_outer_step_beyond_float32_falls_back_to_the_average():
    huge = np.full(4, 3e38, np.float32)
    average = -huge
    np.testing.assert_array_equal(OuterNesterov(lr=4.0).step(huge, average.copy()), average)


def test_store_rounds_go_through_the_outer_optimizer():
    store = ParameterStore(CENTER.copy(), [(4,)], num_workers=2, outer=OuterNesterov(lr=2.0))
    threads = [
        threading.Thread(target=store.barrier, args=(0, w, CENTER + (w + 1) * DELTA, 10))
        for w in (0, 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # twice the way to the average
    np.testing.assert_allclose(store.center, CENTER + 2 * 1.5 * DELTA)


@pytest.mark.parametrize("rule", ["downpour", "adag", "dynsgd", "sasgd", "easgd"])
def test_in_place_matches_the_locked_result(rule):
    r = make_rule(rule)
    expected_center, expected_reply = r.apply(CENTER, DELTA, staleness=1, window=4)
    center = CENTER.copy()
    reply = r.apply_in_place(center, DELTA, staleness=1, window=4)
    np.testing.assert_allclose(center, expected_center)
    np.testing.assert_allclose(reply, expected_reply)


def test_rule_does_not_mutate_its_inputs():
    center, delta = CENTER.copy(), DELTA.copy()
    for name in ("downpour", "adag", "dynsgd", "sasgd", "easgd"):
        make_rule(name).apply(center, delta, 2, 3)
    np.testing.assert_array_equal(center, CENTER)
    np.testing.assert_array_equal(delta, DELTA)


def test_unknown_rule_and_bad_alpha():
    with pytest.raises(ValueError, match="Known rules"):
        make_rule("sgd")
    with pytest.raises(ValueError, match="alpha"):
        ElasticAveraging(alpha=1.5)


def test_store_counts_staleness_and_scales_a_stale_push_like_dynsgd():
    store = ParameterStore(CENTER.copy(), [(4,)], num_workers=2, rule=DynSGD())
    store.pull(0), store.pull(1)
    store.push(0, DELTA, window=5, samples=10)  # fresh: applied in full
    _, version, staleness = store.push(1, DELTA, window=5, samples=10)  # one update behind
    assert staleness == 1 and version == 2
    np.testing.assert_allclose(store.center, CENTER + DELTA + 0.5 * DELTA)
    stats = store.stats()
    assert stats["staleness"]["histogram"] == {"0": 1, "1": 1}
    assert stats["worker_pushes"] == {"0": 1, "1": 1} and stats["worker_samples"] == {
        "0": 10,
        "1": 10,
    }


def test_hogwild_store_applies_in_place_and_counts_no_overlap_when_serial():
    store = ParameterStore(CENTER.copy(), [(4,)], num_workers=1, rule=Downpour(), lock=False)
    store.pull(0)
    store.push(0, DELTA, window=1, samples=1)
    np.testing.assert_allclose(store.center, CENTER + DELTA)
    assert store.stats()["overlapping_writes"] == 0
