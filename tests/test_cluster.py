"""A real Spark standalone cluster (master + 2 workers) started on this machine, trained on,
stopped."""

import socket
import subprocess
from pathlib import Path

import pytest

from kerasonspark import ConfigurationError, SparkEnvironmentError, StandaloneCluster

from conftest import run_driver_program

pytestmark = pytest.mark.spark
TESTS = Path(__file__).parent


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_engines_train_on_a_cluster_survive_lost_executors_and_workers_and_it_stops_cleanly(
    tmp_path,
):
    cluster = StandaloneCluster(workers=3, memory_per_worker="1g", work_dir=str(tmp_path))
    with cluster:
        pids = list(cluster.state.pids)
        assert len(pids) == 4 and all(alive(pid) for pid in pids)
        assert [w["state"] for w in cluster.status()["workers"]] == ["ALIVE"] * 3
        report = run_driver_program("cluster_driver.py", cluster.master_url, cluster.state.web_ui)
    assert report["master"] == cluster.master_url and report["server_host"] == "127.0.0.1"
    # The driver trained with the checkout under test, not some other installed copy.
    assert (
        Path(report["package"]).resolve()
        == (TESTS.parent / "kerasonspark" / "__init__.py").resolve()
    )
    assert report["sync"]["accuracy"] > 0.9
    assert sorted(report["sync"]["worker_samples"]) == [600, 600]  # each row in one partition
    # Last, on the worker left: executors that cannot import kerasonspark (but have TensorFlow) get
    # it shipped, and `async` trains there; executors without Keras are refused, naming it.
    ship = report["ship"]
    assert ship["lacking_before"] == ["kerasonspark"]
    assert ship["async"] > 0.9
    assert ".zip" in ship["executor_package"] and "kerasonspark-" in ship["executor_package"]
    assert len(ship["shipped_logs"]) == 1 and "shipped kerasonspark-" in ship["shipped_logs"][0]
    assert ship["without_keras"].startswith(
        "The executors' Python cannot import keras, which kerasonspark needs"
    )
    # The application held one core on each worker: the training ran in the cluster's executors.
    assert report["apps"] == [{"name": "kerasonspark-cluster-test", "cores": 3}]
    assert report["workers_busy"] == [1, 1, 1]
    # An executor JVM killed mid-training: with max_restarts=0, fit fails at once, naming the worker
    # and why; by default the stage restarts on the executor Spark starts in its place and the run
    # goes on (until a callback stops it 5 epochs after the kill, with every epoch in the history).
    lost = report["lost_executor"]
    assert lost["error"] and "executor was lost" in lost["error"] and lost["worker"] in (0, 1, 2)
    assert lost["seconds"] < 120 and lost["threads"] == []
    restarted = report["restarted"]
    assert (
        restarted["error"] is None and restarted["restarts"] == 1 and 5 < restarted["epochs"] < 150
    ), restarted
    assert "executor was lost" in restarted["causes"][0] and restarted["accuracy"] > 0.9
    assert restarted["threads"] == []
    # A worker lost for good, with restart_with_fewer_workers: the run goes on with the other two,
    # on all the rows.
    shrunk = report["shrunk"]
    assert shrunk["error"] is None, shrunk
    assert shrunk["restarts"] == 1 and shrunk["num_workers"] == 2 and 5 < shrunk["epochs"] < 400, (
        shrunk
    )
    assert sum(shrunk["worker_samples"]) == 1200 and len(shrunk["worker_samples"]) == 2
    assert shrunk["accuracy"] > 0.9 and shrunk["threads"] == []
    # Without it: the restart waits restart_timeout (5 s) for the lost slot, then fails naming the
    # shortfall.
    no_slot = report["no_slot"]
    assert no_slot["error"].startswith("SparkEnvironmentError: The restart needs 2 task slots"), (
        no_slot
    )
    assert "restart_timeout=5 s" in no_slot["error"] and "offers 1" in no_slot["error"]
    assert no_slot["seconds"] < 120 and no_slot["threads"] == []
    # Nothing is left running.
    assert not any(alive(pid) for pid in pids)
    host, port = cluster.master_url[len("spark://") :].split(":")
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2)


def test_a_worker_that_cannot_start_is_reported_with_its_log(tmp_path):
    cluster = StandaloneCluster(
        workers=1, memory_per_worker="lots", work_dir=str(tmp_path), start_timeout=60
    )
    with pytest.raises(SparkEnvironmentError) as failed:
        cluster.start()
    assert "worker-0" in str(failed.value) and "exited" in str(failed.value)
    assert not any(alive(pid) for pid in cluster.state.pids)


def test_cluster_arguments_are_checked():
    with pytest.raises(ConfigurationError, match="workers"):
        StandaloneCluster(workers=0)


def test_a_taken_master_port_is_named_not_silently_moved(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cluster = StandaloneCluster(workers=1, port=taken.getsockname()[1], work_dir=str(tmp_path))
        with pytest.raises(SparkEnvironmentError, match="master exited.*port is taken"):
            cluster.start()
    assert not any(alive(pid) for pid in cluster.state.pids)


def test_stop_signals_only_spark_process_groups():
    from kerasonspark._cluster import stop_processes

    # as if a stale state file named it
    bystander = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        stop_processes([bystander.pid], timeout=1)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
