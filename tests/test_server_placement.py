"""The parameter server inside the training stage (``spark.kerasonspark.serverPlacement=stage``)
on a classic session: the runs tests/test_connect.py makes over Connect from a client the
executors cannot reach, and what the placement refuses before any work."""

import keras
import pytest
from stage_placement_driver import PLACEMENT, check, placed_in_stage

from kerasonspark import ConfigurationError, SparkTrainer

from conftest import make_blobs, run_driver_program, small_model

pytestmark = pytest.mark.spark


def test_sync_sharded_sync_and_async_train_with_callbacks_steered_in_the_stage(spark):
    check(placed_in_stage(spark))


class HoldsALock(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        import threading

        self.lock = threading.Lock()


@pytest.mark.parametrize(
    ("setting", "fit_options", "message"),
    [
        ("stage", {"callbacks": [HoldsALock()]}, "HoldsALock does not"),
        ("stage", {"callbacks": "BACKUP"}, "Backups are written by the client's steering"),
        ("elsewhere", {}, "must be one of 'client', 'stage'. Received: 'elsewhere'"),
    ],
)
def test_the_stage_placement_refuses_what_it_cannot_do_before_training(
    spark, tmp_path, setting, fit_options, message
):
    x, y = make_blobs(200)
    trainer = SparkTrainer(small_model(), backend="sync", num_workers=2, epochs=1, spark=spark)
    before = [w.copy() for w in trainer.model.get_weights()]
    if fit_options.get("callbacks") == "BACKUP":
        fit_options = {"callbacks": [keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))]}
    spark.conf.set(PLACEMENT, setting)
    try:
        with pytest.raises(ConfigurationError, match=message):
            trainer.fit(x, y, **fit_options)
    finally:
        spark.conf.unset(PLACEMENT)
    assert all((a == b).all() for a, b in zip(before, trainer.model.get_weights(), strict=True))


@pytest.mark.parametrize("placement", ["client", "stage"])
def test_an_interrupted_fit_leaves_no_job_running_and_the_session_trains_again(placement):
    # in its own process: the interrupt is a signal, and the session is that process's
    report = run_driver_program("interrupt_driver.py", placement)
    assert report["interrupted"], report
    assert report["jobs_left"] == 0, report
    assert report["accuracy_after"] > 0.5, report
