"""backend="elephas": Elephas 7.3 trains through the common interface, in each of its modes."""

import multiprocessing
import sys
import threading

import keras
import numpy as np
import pytest

from kerasonspark import ConfigurationError, SparkTrainer

from conftest import make_blobs, small_model

# Elephas comes from README's install command: pip install --no-deps elephas==7.3.0 h5py
pytestmark = pytest.mark.spark


def train(spark, epochs=2, callbacks=None, **options):
    x, y = make_blobs(1200)
    trainer = SparkTrainer(
        small_model(),
        backend="elephas",
        backend_options=options,
        num_workers=2,
        epochs=epochs,
        spark=spark,
        verbose=0,
    )
    return trainer, trainer.fit((x, y), validation_data=(x[:300], y[:300]), callbacks=callbacks)


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "synchronous"},
        {"mode": "asynchronous"},
        {"mode": "hogwild"},
        {"mode": "asynchronous", "frequency": "epoch", "parameter_server_mode": "socket"},
    ],
    ids=[
        "synchronous",
        "asynchronous-batch-http",
        "hogwild-batch-http",
        "asynchronous-epoch-socket",
    ],
)
def test_each_mode_trains_and_returns_the_common_result_leaving_nothing_behind(spark, options):
    threads = {t.ident for t in threading.enumerate()}
    initial = small_model().get_weights()
    _, result = train(spark, **options)
    assert result.history["val_accuracy"][-1] > 0.9 and len(result.history["val_loss"]) == 2
    assert not all(
        np.array_equal(a, b) for a, b in zip(initial, result.model.get_weights(), strict=True)
    )
    stats = result.stats
    assert stats["backend"] == "elephas" and stats["epochs"] == 2 and stats["num_workers"] == 2
    assert stats["samples"] == 2 * 1200 and stats["samples_per_second"] > 0
    assert stats["elephas"]["mode"] == options["mode"]
    if options["mode"] == "synchronous":
        # one average per epoch, with training metrics
        assert stats["exchanges"] == 2 and "loss" in result.history
    elif options.get("frequency") == "epoch":
        assert stats["exchanges"] == 2 * 2  # one push per worker per epoch
    else:
        assert stats["exchanges"] == 2 * 2 * (600 // 32 + 1)  # one push per batch
    leftover = [t.name for t in threading.enumerate() if t.ident not in threads]
    assert leftover == [] and multiprocessing.active_children() == []


def test_epoch_callbacks_run_and_batch_callbacks_are_refused_before_training(spark):
    class Epochs(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.logs = []

        def on_epoch_end(self, epoch, logs=None):
            self.logs.append(dict(logs))

    epochs = Epochs()
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, min_delta=10.0)
    _, result = train(spark, epochs=5, callbacks=[epochs, stopper])
    # stopped after the second epoch
    assert len(epochs.logs) == 2 and "val_accuracy" in epochs.logs[0]
    assert len(result.history["val_loss"]) == 2

    with pytest.raises(ConfigurationError, match="batch hooks cannot run \\(TerminateOnNaN\\)"):
        train(spark, callbacks=[keras.callbacks.TerminateOnNaN()])


def test_bad_options_and_a_missing_elephas_get_clear_errors(spark, monkeypatch):
    with pytest.raises(ConfigurationError, match="averages once per epoch"):
        SparkTrainer(
            small_model(),
            backend="elephas",
            backend_options={"mode": "synchronous", "frequency": "batch"},
        )
    with pytest.raises(ConfigurationError, match="`mode` must be one of"):
        SparkTrainer(small_model(), backend="elephas", backend_options={"mode": "async"})
    monkeypatch.setitem(sys.modules, "elephas.spark_model", None)
    with pytest.raises(ConfigurationError, match="pip install --no-deps elephas==7.3.0 h5py"):
        train(spark, epochs=1)
