"""Shared fixtures: one real local[2] Spark session, small learnable data, small models."""

from __future__ import annotations

import os
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest


@pytest.fixture(scope="session")
def spark():
    from kerasonspark.session import start_session

    session = start_session("local[2]", "kerasonspark-tests")
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def make_blobs(n: int = 1200, classes: int = 4, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well separated Gaussian clusters: a trained model scores ~1.0, an untrained one ~1/classes."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(classes, dim))
    y = rng.integers(0, classes, size=n)
    x = centers[y] + rng.normal(size=(n, dim))
    return x.astype(np.float32), y.astype(np.int64)


@pytest.fixture
def blobs():
    return make_blobs()


def small_model(dim: int = 16, classes: int = 4, loss: str = "sparse_categorical_crossentropy", seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((dim,)),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(classes, activation="softmax"),
    ])
    model.compile(keras.optimizers.Adam(0.01), loss, metrics=["accuracy"])
    return model


@pytest.fixture
def no_leaked_threads():
    """Fails the test if it leaves parameter-server threads running."""
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("kerasonspark-ps")]
    assert not leaked, f"threads left running: {leaked}"
