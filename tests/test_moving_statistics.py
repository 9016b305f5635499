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
