"""Moving statistics (BatchNormalization's moving mean and variance) are state, not gradients:
after a ``sync`` fit the center holds the statistics of every worker's steps, as one process
would after the same batches, not of one worker's."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasonspark._serialization import get_flat_weights
from kerasonspark._state import MovingStatistics
from kerasonspark.testing import fit_in_process

from conftest import make_blobs


def batch_norm_model(momentum: float = 0.99) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.BatchNormalization(momentum=momentum),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def test_averaging_advanced_statistics_equals_one_process_taking_every_workers_steps():
    model = batch_norm_model(momentum=0.9)
    moving = MovingStatistics(model)
    assert [(b - a, m) for a, b, m in moving.slices] == [(16, 0.9), (16, 0.9)]
    start = get_flat_weights(model)
    a, b, _ = moving.slices[0]  # the moving mean, 0 at the start
    workers, steps, batch_mean = 3, 8, 2.0
    copies = []
    for _ in range(workers):
        weights = start.copy()
        weights[a:b] = 0.9**steps * start[a:b] + (1 - 0.9**steps) * batch_mean  # k EMA steps
        weights[: a or None] += 0.5  # a trainable weight's change is left as it is
        copies.append(moving.advance(weights, start, steps, workers))
    average = np.mean(copies, axis=0)
    np.testing.assert_allclose(average[a:b], (1 - 0.9 ** (workers * steps)) * batch_mean, rtol=1e-5)
    assert not MovingStatistics(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))


@pytest.mark.inprocess
@pytest.mark.parametrize("center", ["driver", "sharded"])
def test_a_sync_center_holds_the_statistics_of_every_workers_steps(center):
    x, y = make_blobs(1600)
    x = x + 5.0  # features far from the initial moving mean of 0
    steps = 1600 // 16  # both workers' steps, summed
    plain = batch_norm_model()
    plain.fit(x, y, batch_size=16, epochs=1, shuffle=True, verbose=0)
    model = batch_norm_model()
    fit_in_process(
        "sync",
        model,
        x,
        y,
        batch_size=16,
        backend_options={"center": center, "barrier_timeout": 30},
    )
    mean = model.layers[0].moving_mean.numpy()
    expected = (1 - 0.99**steps) * x.mean(axis=0)
    one_worker = (1 - 0.99 ** (steps // 2)) * x.mean(axis=0)  # what plain averaging left
    np.testing.assert_allclose(mean, expected, rtol=0.05)
    assert np.abs(mean - one_worker).mean() > 5 * np.abs(mean - expected).mean()
    np.testing.assert_allclose(mean, plain.layers[0].moving_mean.numpy(), rtol=0.05)


@pytest.mark.parametrize("lock", [True, False])
def test_layer_state_bypasses_the_update_rule(lock):
    from kerasonspark.parameter_server._rules import DynSGD, ElasticAveraging
    from kerasonspark.parameter_server._store import ParameterStore

    center = np.arange(10, dtype=np.float32)
    delta = np.ones(10, np.float32)
    store = ParameterStore(center, [(10,)], 2, rule=DynSGD(), lock=lock, state=[(2, 4), (8, 10)])
    store.pull(0)
    store.push(1, delta, window=4, samples=4)  # the center moves: worker 0's push is stale
    reply, _, staleness = store.push(0, delta, window=4, samples=4)
    assert staleness == 1
    moved = store.center - center
    np.testing.assert_allclose(moved[[0, 1, 4, 5, 6, 7]], 1.5)  # 1 + 1/2: the rule's division
    np.testing.assert_allclose(moved[[2, 3, 8, 9]], 2.0)  # state: each push's change in full
    np.testing.assert_array_equal(reply, store.center)

    weights = np.full(10, 20.0, np.float32)
    elastic = ParameterStore(
        center, [(10,)], 2, rule=ElasticAveraging(0.5), lock=lock, state=[(0, 3)]
    )
    reply, _, _ = elastic.push(0, weights, window=4, samples=4)
    np.testing.assert_allclose(elastic.center[:3], 20.0)  # the pushing worker's statistics
    np.testing.assert_allclose(elastic.center[3:], (center[3:] + 20.0) / 2)
    np.testing.assert_allclose(reply[:3], 20.0)


@pytest.mark.inprocess
@pytest.mark.parametrize(
    ("engine", "options"),
    [
        ("async", {"rule": "adag"}),
        ("async", {"rule": "dynsgd", "center": "sharded"}),
        ("hogwild", {"rule": "adag"}),
    ],
)
def test_an_asynchronous_center_holds_the_statistics_of_every_push(engine, options):
    x, y = make_blobs(1600)
    x = x + 5.0
    steps = 1600 // 16
    model = batch_norm_model()
    fit_in_process(engine, model, x, y, batch_size=16, backend_options={"window": 5, **options})
    mean = model.layers[0].moving_mean.numpy()
    expected = (1 - 0.99**steps) * x.mean(axis=0)
    # through the rule, adag divided their change by the window: 0.28 of the way there
    np.testing.assert_allclose(mean, expected, rtol=0.05)
