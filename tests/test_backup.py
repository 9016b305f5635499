"""Back up and resume the Keras way: atomic backups, a crashed driver's run resumed, mismatches
refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest

from kerasonspark import ConfigurationError, SparkTrainer
from kerasonspark._backup import BackupStore, RunState, check_resumable, run_settings

from conftest import make_blobs, small_model


def state(epoch: int, value: float) -> RunState:
    return RunState(
        epoch=epoch,
        center=np.full(10, value, np.float32),
        resume={0: 3, 1: 2},
        history={"loss": [1.0] * epoch},
        exchanges=7 * epoch,
        settings={"model": "m", "engine": "sync"},
    )


@pytest.fixture
def s3_server(monkeypatch):
    """A real S3 protocol server (moto's) on loopback; its URI prefix for pyarrow.fs."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield (
            f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
            "&allow_bucket_creation=true"
        )
    finally:
        server.stop()


def test_backups_go_to_an_object_store_by_uri_and_resume_from_it(s3_server):
    uri = f"s3://backups/run?{s3_server}"
    store = BackupStore(uri, keep=2)
    store.files.create_dir("backups")  # the bucket
    for epoch in range(1, 4):
        store.save(state(epoch, float(epoch)))
    latest = BackupStore(uri).latest()  # another process's view: only the store is shared
    assert latest.epoch == 3 and latest.resume == {0: 3, 1: 2}
    np.testing.assert_array_equal(latest.center, np.full(10, 3.0))
    assert [n for n, _ in store._complete()] == [2, 3]  # pruned to `keep`
    store.clear()
    assert BackupStore(uri).latest() is None


@pytest.mark.parametrize("uri", [False, True], ids=["path", "file-uri"])
def test_backups_are_atomic_and_a_half_written_one_is_never_taken(tmp_path, caplog, uri):
    # a URI goes through pyarrow.fs as s3://, hdfs:// or gs:// would
    store = BackupStore(f"file://{tmp_path / 'b'}" if uri else tmp_path / "b", keep=3)
    store.save(state(1, 1.0))
    second = Path(store.save(state(2, 2.0)))
    latest = store.latest()
    assert latest.epoch == 2 and latest.resume == {0: 3, 1: 2} and latest.exchanges == 14
    np.testing.assert_array_equal(latest.center, np.full(10, 2.0))
    assert json.loads((tmp_path / "b" / "latest.json").read_text()) == {"backup": second.name}
    # A crash mid-write leaves a .partial folder, or a folder whose manifest never landed: neither
    # is taken.
    (tmp_path / "b" / "backup-000003.partial").mkdir()
    (tmp_path / "b" / "backup-000003.partial" / "manifest.json").write_text(
        '{"format": 1, "epoch": 9'
    )
    (tmp_path / "b" / "backup-000004").mkdir()
    np.save(tmp_path / "b" / "backup-000004" / "center.npy", np.zeros(10, np.float32))
    assert store.latest().epoch == 2
    # A complete-looking backup that does not load is skipped, with a warning, for the one before
    # it.
    (second / "center.npy").write_bytes(b"not an array")
    assert store.latest().epoch == 1
    assert "does not load" in caplog.text


def test_old_backups_are_pruned_and_clear_removes_everything(tmp_path):
    store = BackupStore(tmp_path / "b", keep=2)
    for epoch in range(1, 5):
        store.save(state(epoch, float(epoch)))
    assert sorted(p.name for p in (tmp_path / "b").glob("backup-*")) == [
        "backup-000003",
        "backup-000004",
    ]
    store.clear()
    assert not (tmp_path / "b").exists() and store.latest() is None


def test_a_different_model_engine_or_schema_is_refused_by_name():
    saved = RunState(
        0,
        np.zeros(1, np.float32),
        settings=run_settings("{arch}", "sync", {"input_shape": [16]}, 2, "local[2]"),
    )
    # The number of workers and the master may change.
    check_resumable(
        saved, run_settings("{arch}", "sync", {"input_shape": [16]}, 3, "spark://h:7077")
    )
    with pytest.raises(ConfigurationError, match="model architecture"):
        check_resumable(
            saved, run_settings("{other}", "sync", {"input_shape": [16]}, 2, "local[2]")
        )
    with pytest.raises(ConfigurationError, match="another engine: 'sync', this run has 'async'"):
        check_resumable(
            saved, run_settings("{arch}", "async", {"input_shape": [16]}, 2, "local[2]")
        )
    with pytest.raises(ConfigurationError, match="data schema"):
        check_resumable(saved, run_settings("{arch}", "sync", {"input_shape": [8]}, 2, "local[2]"))
    with pytest.raises(ConfigurationError, match="a URI of a file system pyarrow.fs reaches"):
        BackupStore("nosuchstore://bucket/backups")


class DriverDies(keras.callbacks.Callback):
    """Stands in for a driver that crashes after epoch `at` ended (its backup is not written)."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at:
            raise RuntimeError("the driver died")


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(epoch)


@pytest.mark.spark
@pytest.mark.parametrize("backend", ["sync", "async"])
def test_a_crashed_run_resumes_from_its_backup_and_a_finished_one_deletes_it(
    spark, tmp_path, backend, no_leaked_threads
):
    x, y = make_blobs(900)
    folder = tmp_path / "backup"
    first = SparkTrainer(
        small_model(), backend=backend, num_workers=2, epochs=3, seed=0, verbose=0, spark=spark
    )
    with pytest.raises(RuntimeError, match="the driver died"):
        first.fit(
            (x, y), callbacks=[keras.callbacks.BackupAndRestore(str(folder)), DriverDies(at=1)]
        )
    saved = BackupStore(folder).latest()
    # epoch 0's backup; epoch 1's was never written
    assert saved.epoch == 1 and len(saved.history["loss"]) == 1

    with pytest.raises(ConfigurationError, match="model architecture"):
        SparkTrainer(
            _other_model(), backend=backend, num_workers=2, epochs=3, spark=spark, verbose=0
        ).fit((x, y), callbacks=[keras.callbacks.BackupAndRestore(str(folder))])

    recorder = Recorder()
    model = small_model(seed=7)  # fresh weights: the backup's must win
    result = SparkTrainer(
        model, backend=backend, num_workers=2, epochs=3, seed=0, verbose=0, spark=spark
    ).fit((x, y), callbacks=[keras.callbacks.BackupAndRestore(str(folder)), recorder])
    assert recorder.epochs == [1, 2]
    assert result.stats["epoch_events"]["resumed_from_epoch"] == 1
    assert len(result.history["loss"]) == 3 and result.history["loss"][0] == pytest.approx(
        saved.history["loss"][0]
    )
    assert result.history["accuracy"][-1] > 0.9
    assert not folder.exists()  # a completed run deletes its backup, as Keras does


def _other_model():
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(4, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


class StopsTheDriverMidEpoch(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch >= 400:
            raise RuntimeError("the driver died mid-epoch")


@pytest.mark.spark
def test_a_backup_taken_mid_epoch_resumes_each_worker_where_it_was(
    spark, tmp_path, no_leaked_threads
):
    x, y = make_blobs(24_000)
    folder = tmp_path / "backup"
    options = {"window": 2}
    first = SparkTrainer(
        small_model(),
        backend="async",
        num_workers=2,
        epochs=1,
        batch_size=8,
        seed=0,
        verbose=0,
        spark=spark,
        backend_options=options,
    )
    with pytest.raises(RuntimeError, match="mid-epoch"):
        first.fit(
            (x, y),
            callbacks=[
                keras.callbacks.BackupAndRestore(str(folder), save_freq=20),
                StopsTheDriverMidEpoch(),
            ],
        )
    saved = BackupStore(folder).latest()
    assert saved is not None and saved.epoch == 0 and sum(saved.resume.values()) >= 20
    result = SparkTrainer(
        small_model(),
        backend="async",
        num_workers=2,
        epochs=1,
        batch_size=8,
        seed=0,
        verbose=0,
        spark=spark,
        backend_options=options,
    ).fit((x, y), callbacks=[keras.callbacks.BackupAndRestore(str(folder), save_freq=20)])
    pushes_per_worker = math.ceil(math.ceil(12_000 / 8) / 2)  # windows of 2 steps
    # The resumed stage pushed only what the backup's center did not hold.
    assert result.stats["exchanges"] == 2 * pushes_per_worker - sum(saved.resume.values())
    assert result.history["accuracy"][-1] > 0.9
