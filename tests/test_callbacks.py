"""The driver steers the run: Keras callbacks, the center validated each epoch, stops and learning
rates that reach every worker, live progress, forwarded warnings, the stats page, named Spark jobs.

End to end on local[2] (real Spark, real TensorFlow, the real parameter server on a socket), and
through the in-process runner where Spark adds nothing to what is tested.
"""

from __future__ import annotations

import io
import json
import logging
import math
import urllib.error
import urllib.request

import keras
import numpy as np
import pytest
from stats_page import stats_page_url

from kerasonspark import ConfigurationError, SparkTrainer
from kerasonspark._progress import ProgressBar
from kerasonspark.engine import (
    Engine,
    ParameterStore,
    ServerExchange,
    get_flat_weights,
    set_flat_weights,
)
from kerasonspark.testing import fit_in_process

from conftest import make_blobs, small_model


class CenterRecorder(keras.callbacks.Callback):
    """A user's own callback: keeps the weights the model holds at each epoch end."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[int] = []
        self.weights: list[list[np.ndarray]] = []
        self.logs: list[dict] = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(epoch)
        self.weights.append([w.copy() for w in self.model.get_weights()])
        self.logs.append(dict(logs or {}))


def train_and_validation(
    train: int, validation: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = make_blobs(train + validation)
    return x[:train], y[:train], x[train:], y[train:]


def _steps_per_epoch(result, batch_size: int) -> list[int]:
    return [math.ceil(w["samples"] / batch_size) for w in result.stats["workers"]]


@pytest.mark.spark
@pytest.mark.parametrize("backend", ["sync", "async"])
def test_early_stopping_stops_every_worker_at_the_epoch_boundary_and_fit_returns(
    spark, backend, no_leaked_threads
):
    x, y, vx, vy = train_and_validation(800, 200)
    model = small_model()
    # min_delta 10: no epoch after the first can improve val_loss enough, so epoch 1 triggers the
    # stop.
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_loss", min_delta=10.0, patience=1, restore_best_weights=True
    )
    recorder = CenterRecorder()
    trainer = SparkTrainer(
        model,
        backend=backend,
        num_workers=2,
        epochs=6,
        batch_size=32,
        seed=0,
        verbose=0,
        spark=spark,
    )
    result = trainer.fit((x, y), validation_data=(vx, vy), callbacks=[stopper, recorder])

    assert stopper.stopped_epoch == 1
    assert recorder.epochs == [0, 1]
    assert len(result.history["loss"]) == 2 and len(result.history["val_loss"]) == 2
    assert result.stats["epochs"] == 2 and result.stats["epoch_events"]["stopped_early"] is True
    for worker, steps in zip(result.stats["workers"], _steps_per_epoch(result, 32), strict=True):
        # every worker stopped after epoch 1, none started epoch 2
        assert worker["steps"] == 2 * steps
        assert len(worker["learning_rates"]) == 2
    # restore_best_weights: fit returns the center of the best epoch (the first), not the last one.
    for got, best in zip(model.get_weights(), recorder.weights[0], strict=True):
        np.testing.assert_array_equal(got, best)


@pytest.mark.spark
def test_model_checkpoint_of_each_epoch_predicts_what_the_center_held(
    spark, tmp_path, no_leaked_threads
):
    x, y, vx, vy = train_and_validation(800, 200)
    model = small_model()
    recorder = CenterRecorder()
    every = keras.callbacks.ModelCheckpoint(str(tmp_path / "model-{epoch:02d}.keras"))
    weights_only = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "w-{epoch:02d}.weights.h5"), save_weights_only=True
    )
    best = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "best.keras"), monitor="val_accuracy", mode="max", save_best_only=True
    )
    csv = keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    board = keras.callbacks.TensorBoard(str(tmp_path / "tb"), write_graph=False)
    trainer = SparkTrainer(
        model, backend="sync", num_workers=2, epochs=3, seed=0, verbose=0, spark=spark
    )
    result = trainer.fit(
        (x, y),
        validation_data=(vx, vy),
        callbacks=[recorder, every, weights_only, best, csv, board],
    )

    probe = vx[:64]
    reference = small_model()
    for epoch, weights in enumerate(recorder.weights):
        reference.set_weights(weights)
        expected = reference.predict(probe, verbose=0)
        loaded = keras.models.load_model(tmp_path / f"model-{epoch + 1:02d}.keras")
        np.testing.assert_allclose(loaded.predict(probe, verbose=0), expected, atol=1e-6)
        fresh = small_model(seed=5)
        fresh.load_weights(tmp_path / f"w-{epoch + 1:02d}.weights.h5")
        np.testing.assert_allclose(fresh.predict(probe, verbose=0), expected, atol=1e-6)
    # The last epoch's center is the model fit returns.
    np.testing.assert_allclose(
        model.predict(probe, verbose=0), reference.predict(probe, verbose=0), atol=1e-6
    )

    best_epoch = int(np.argmax(result.history["val_accuracy"]))
    reference.set_weights(recorder.weights[best_epoch])
    np.testing.assert_allclose(
        keras.models.load_model(tmp_path / "best.keras").predict(probe, verbose=0),
        reference.predict(probe, verbose=0),
        atol=1e-6,
    )

    rows = (tmp_path / "log.csv").read_text().strip().splitlines()
    assert rows[0].split(",")[0] == "epoch" and "val_loss" in rows[0] and len(rows) == 4
    assert [
        float(r.split(",")[rows[0].split(",").index("loss")]) for r in rows[1:]
    ] == pytest.approx(result.history["loss"])
    events = [p for p in (tmp_path / "tb").rglob("events.out.tfevents.*")]
    assert {p.parent.name for p in events} >= {"train", "validation"}


@pytest.mark.spark
@pytest.mark.parametrize("backend", ["sync", "async", "hogwild"])
def test_center_validation_equals_evaluate_of_the_returned_model(spark, backend, no_leaked_threads):
    x, y, vx, vy = train_and_validation(800, 300)
    model = small_model()
    trainer = SparkTrainer(
        model, backend=backend, num_workers=2, epochs=2, seed=0, verbose=0, spark=spark
    )
    result = trainer.fit((x, y), validation_data=(vx, vy))
    scores = model.evaluate(vx, vy, batch_size=256, verbose=0, return_dict=True)
    assert result.history["val_loss"][-1] == pytest.approx(scores["loss"], abs=1e-3)
    assert result.history["val_accuracy"][-1] == pytest.approx(scores["accuracy"], abs=1e-3)
    assert result.history["val_accuracy"][-1] > 0.8


@pytest.mark.spark
@pytest.mark.parametrize("which", ["scheduler", "plateau"])
def test_learning_rate_callbacks_reach_every_worker_before_its_next_epoch(
    spark, which, no_leaked_threads
):
    x, y, vx, vy = train_and_validation(800, 200)
    if which == "scheduler":
        callback = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.02 / (epoch + 1))
        expected = [0.02, 0.01, 0.02 / 3]
    # min_delta 10: every epoch after the first is a plateau, so Adam's 0.01 halves after epoch 1
    else:
        callback = keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.5, patience=0, min_delta=10.0, min_lr=0.0
        )
        expected = [0.01, 0.01, 0.005]
    trainer = SparkTrainer(
        small_model(), backend="async", num_workers=2, epochs=3, seed=0, verbose=0, spark=spark
    )
    result = trainer.fit((x, y), validation_data=(vx, vy), callbacks=[callback])
    # the rate each worker's optimizer trained each epoch with
    for worker in result.stats["workers"]:
        assert worker["learning_rates"] == pytest.approx(expected, rel=1e-5)
    assert result.history["learning_rate"] == pytest.approx(expected, rel=1e-5)  # as Keras logs it


@pytest.mark.spark
def test_terminate_on_nan_stops_every_worker_and_keeps_the_center_finite(spark, no_leaked_threads):
    x, y = make_blobs(1200)
    model = small_model()
    model.compile(
        keras.optimizers.SGD(1e9), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    trainer = SparkTrainer(
        model,
        backend="sync",
        num_workers=2,
        epochs=4,
        seed=0,
        verbose=0,
        spark=spark,
        backend_options={"sync_every": 2},
    )
    result = trainer.fit((x, y), callbacks=[keras.callbacks.TerminateOnNaN()])
    assert len(result.history["loss"]) == 1 and not math.isfinite(result.history["loss"][0])
    assert result.stats["parameter_server"]["refused_total"] == 0  # no NaN ever reached the server
    assert all(np.isfinite(w).all() for w in model.get_weights())


@pytest.mark.spark
def test_initial_epoch_and_validation_freq_as_in_keras(spark, no_leaked_threads):
    x, y, vx, vy = train_and_validation(600, 200)
    recorder = CenterRecorder()
    trainer = SparkTrainer(
        small_model(), backend="sync", num_workers=2, epochs=5, seed=0, verbose=0, spark=spark
    )
    result = trainer.fit(
        (x, y), validation_data=(vx, vy), callbacks=[recorder], initial_epoch=2, validation_freq=2
    )
    assert recorder.epochs == [2, 3, 4]
    assert len(result.history["loss"]) == 3
    # as Keras counts: (epoch + 1) % 2 == 0 only for epoch 3
    assert len(result.history["val_loss"]) == 1
    assert "val_loss" in recorder.logs[1] and "val_loss" not in recorder.logs[0]


@pytest.mark.spark
def test_single_hands_callbacks_to_model_fit(spark):
    x, y = make_blobs(400)
    recorder = CenterRecorder()
    trainer = SparkTrainer(small_model(), backend="single", epochs=2, verbose=0, spark=spark)
    trainer.fit(
        (x, y),
        callbacks=[
            recorder,
            keras.callbacks.EarlyStopping(monitor="loss", min_delta=10.0, patience=0),
        ],
    )
    assert recorder.epochs == [0, 1]


def test_callbacks_are_checked_before_any_work():
    trainer = SparkTrainer(small_model(), backend="sync")
    with pytest.raises(TypeError, match="keras.callbacks.Callback"):
        trainer.fit((np.zeros((4, 16), np.float32), np.zeros(4)), callbacks=[print])

    class NoCallbacks(type(trainer.engine)):
        def check_fit(self, model, callbacks, weighted):
            if callbacks:
                raise ConfigurationError("This engine cannot run Keras callbacks.")

    refusing = SparkTrainer(small_model(), backend=NoCallbacks())
    with pytest.raises(ConfigurationError, match="cannot run Keras callbacks"):
        refusing.fit((np.zeros((4, 16), np.float32), np.zeros(4)), callbacks=[CenterRecorder()])


class WarningExchange(ServerExchange):
    """Averages once an epoch, and warns through a kerasonspark logger when a worker starts."""

    holds_center = True

    def start(self, model, worker):
        super().start(model, worker)
        self.round = 0
        logging.getLogger("kerasonspark.custom").warning("worker %d starts", worker)

    def exchange(self, model, samples):
        set_flat_weights(
            model, self.client.barrier(self.round, get_flat_weights(model), self.shapes, samples)
        )
        self.round += 1


class WarningEngine(Engine):
    name = "warning"

    def run(self, job):
        store = ParameterStore(job.spec.weights, job.spec.shapes, job.config.num_workers)
        outcome = job.serve(store, lambda url, secret: WarningExchange(url, secret, timeout=60))
        return job.result(
            outcome.reports, store.center, outcome.seconds, exchanges=outcome.server_stats["rounds"]
        )


class StopAtFirstReport(keras.callbacks.Callback):
    """Sets ``stop_training`` at the first batch-level hook."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append(batch)
        assert "loss" in (logs or {})
        self.model.stop_training = True


@pytest.mark.inprocess
@pytest.mark.parametrize(
    "backend,options",
    [
        ("sync", {"sync_every": 4, "center": "driver"}),
        # no round meets on the driver: the stop reaches the workers in a progress report's answer
        ("sync", {"sync_every": 4, "center": "sharded", "barrier_timeout": 30}),
        ("async", {"window": 4}),
        ("async", {"window": 4, "center": "sharded", "timeout": 30}),
    ],
)
def test_a_stop_from_a_batch_hook_ends_the_epoch_early_on_every_worker(backend, options):
    x, y = make_blobs(20_000)
    stopper = StopAtFirstReport()
    result = fit_in_process(
        backend,
        small_model(),
        x,
        y,
        epochs=3,
        batch_size=16,
        callbacks=[stopper],
        backend_options=options,
    )
    assert stopper.batches, "no progress report reached the driver"
    assert len(result.history["loss"]) == 1
    full_epoch = math.ceil(10_000 / 16)
    assert all(w["steps"] < full_epoch for w in result.stats["workers"])


class StepRecorder(keras.callbacks.Callback):
    """Reads ``optimizer.iterations`` where Keras's own step-counting callbacks read it."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_steps: list[int] = []
        self.epoch_steps: list[int] = []

    def on_train_batch_end(self, batch, logs=None):
        self.batch_steps.append(int(self.model.optimizer.iterations))

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_steps.append(int(self.model.optimizer.iterations))


@pytest.mark.inprocess
@pytest.mark.parametrize("backend", ["sync", "async"])
def test_callbacks_read_the_global_step_from_optimizer_iterations(backend, tmp_path):
    x, y = make_blobs(12_000)
    model = small_model()
    model.optimizer.iterations.assign(100)  # a model trained before: its count goes on
    steps = StepRecorder()
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "step-{epoch}-{batch}.weights.h5"), save_weights_only=True, save_freq=1
    )
    result = fit_in_process(
        backend, model, x, y, epochs=2, batch_size=16, callbacks=[steps, checkpoint]
    )
    per_epoch = math.ceil(6_000 / 16) * 2  # every worker's steps, summed: plain Keras's count
    assert steps.epoch_steps == [100 + per_epoch, 100 + 2 * per_epoch]
    assert int(model.optimizer.iterations) == 100 + 2 * per_epoch
    assert result.stats["epoch_events"]["global_step"] == 100 + 2 * per_epoch
    assert steps.batch_steps, "no progress report reached the driver"
    assert steps.batch_steps == sorted(steps.batch_steps)
    assert 100 < steps.batch_steps[0] and steps.batch_steps[-1] <= 100 + 2 * per_epoch
    # ModelCheckpoint(save_freq=N) counts the steps each hook's `batch` says were taken
    saved = [int(p.name.split("-")[2].split(".")[0]) for p in tmp_path.glob("step-*.weights.h5")]
    assert saved and all(0 < batch <= per_epoch for batch in saved)


@pytest.mark.inprocess
def test_live_stats_page_and_json_open_to_the_view_token_only(caplog):
    x, y = make_blobs(1200)
    seen: dict = {}

    class ReadThePage(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            url = next(
                u for r in caplog.records if (u := stats_page_url(r.getMessage())) is not None
            )
            seen["html"] = urllib.request.urlopen(url, timeout=10).read().decode()
            seen["stats"] = json.loads(
                urllib.request.urlopen(url.replace("/dashboard?", "/stats?"), timeout=10).read()
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url.split("?")[0] + "?token=wrong", timeout=10)
            seen["refused"] = refused.value.code

    with caplog.at_level(logging.INFO, logger="kerasonspark"):
        fit_in_process("async", small_model(), x, y, epochs=1, callbacks=[ReadThePage()])
    assert "<title>kerasonspark: live training</title>" in seen["html"]
    live = seen["stats"]["live"]
    assert sorted(live["workers"]) == ["0", "1"]
    assert all(w["epoch"] == 0 and w["samples"] > 0 for w in live["workers"].values())
    assert seen["stats"]["updates"] > 0
    assert seen["refused"] == 401


@pytest.mark.spark
def test_progress_bar_and_named_jobs_during_a_real_fit(spark, capsys, no_leaked_threads):
    x, y = make_blobs(600)
    trainer = SparkTrainer(
        small_model(), backend="sync", num_workers=2, epochs=2, seed=0, verbose=1, spark=spark
    )
    trainer.fit((x, y))
    out = capsys.readouterr().out
    assert "Epoch 1/2" in out and "Epoch 2/2" in out and "samples/s" in out and "rounds:" in out
    assert "\r" not in out  # captured output is not a terminal: plain lines

    store = spark.sparkContext._jsc.sc().statusStore()
    jobs = store.jobsList(None)

    def value(option):
        return option.get() if option.isDefined() else None

    described = {
        (value(jobs.apply(i).jobGroup()), value(jobs.apply(i).description()))
        for i in range(jobs.size())
    }
    assert ("kerasonspark", "kerasonspark fit sync (2 epochs, 2 workers)") in described
    assert ("kerasonspark", "kerasonspark prepare") in described


def test_progress_bar_writes_plain_lines_where_output_is_a_file():
    stream = io.StringIO()
    bar = ProgressBar(1, epochs=3, samples_per_epoch=1000, stream=stream, plain_interval=0.0)
    bar.start_epoch(0)
    bar.update(500, {"loss": 0.5, "rounds": 3})
    bar.end_epoch({"loss": 0.25, "val_loss": 0.3, "rounds": 6})
    lines = stream.getvalue().splitlines()
    assert lines[0] == "Epoch 1/3"
    assert (
        lines[1].startswith("500/1000 [==========>.........]")
        and "rounds: 3" in lines[1]
        and "loss: 0.5000" in lines[1]
    )
    assert (
        lines[2].startswith("1000/1000 [====================]") and "val_loss: 0.3000" in lines[2]
    )
    silent = io.StringIO()
    quiet = ProgressBar(0, epochs=1, samples_per_epoch=10, stream=silent)
    quiet.start_epoch(0)
    quiet.end_epoch({"loss": 1.0})
    assert silent.getvalue() == ""
    two = io.StringIO()
    per_epoch = ProgressBar(2, epochs=1, samples_per_epoch=10, stream=two, plain_interval=0.0)
    per_epoch.start_epoch(0)
    per_epoch.update(5, {"loss": 1.0})
    per_epoch.end_epoch({"loss": 0.5})
    assert (
        two.getvalue().splitlines()[1].startswith("10/10") and len(two.getvalue().splitlines()) == 2
    )


@pytest.mark.spark
def test_worker_warnings_reach_the_driver_log_tagged_with_the_worker(
    spark, caplog, no_leaked_threads
):
    x, y = make_blobs(400)
    with caplog.at_level(logging.WARNING, logger="kerasonspark"):
        SparkTrainer(
            small_model(), backend=WarningEngine(), num_workers=2, epochs=1, verbose=0, spark=spark
        ).fit((x, y))
    forwarded = sorted(r.getMessage() for r in caplog.records if r.name == "kerasonspark.worker")
    assert any(
        m.startswith("worker 0: WARNING kerasonspark.custom: worker 0 starts") for m in forwarded
    ), forwarded
    assert any(
        m.startswith("worker 1: WARNING kerasonspark.custom: worker 1 starts") for m in forwarded
    ), forwarded
