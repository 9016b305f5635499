"""The epoch gate and progress board (plain logic), and their routes on the real server."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from kerasonspark import FailureConfig, ParameterServerError
from kerasonspark.parameter_server import (
    ParameterClient,
    ParameterServer,
    ParameterStore,
    ServerConfig,
    new_secret,
)
from kerasonspark.parameter_server._board import EpochBoard
from kerasonspark.parameter_server._store import RoundClosedError

SHAPES = [(3, 2), (2,)]


def make_board(workers: int = 2, **kwargs) -> EpochBoard:
    return EpochBoard(
        ParameterStore(np.arange(8, dtype=np.float32), SHAPES, workers), workers, **kwargs
    )


def in_thread(target, *args):
    out: dict = {}

    def run():
        try:
            out["value"] = target(*args)
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_epoch_center_is_fixed_by_the_last_arrival_and_decisions_reach_every_worker():
    board = make_board()
    first, first_out = in_thread(board.arrive, 0, 0, 10, {"loss": 1.0}, True)
    assert board.wait_arrivals(0, 0.2) is None  # one of two arrived
    board.store._center = board.store.center + 1  # the center moves until the last worker arrives
    second, second_out = in_thread(board.arrive, 1, 0, 30, {"loss": 3.0}, False)
    arrivals = board.wait_arrivals(0, 5)
    first.join(5), second.join(5)
    assert sorted(arrivals) == [0, 1] and arrivals[1]["samples"] == 30
    np.testing.assert_array_equal(first_out["value"], np.arange(8) + 1)
    assert second_out["value"] is None  # this worker holds the center already
    waiting = [in_thread(board.ready, w, 0, 5, {"loss": 0.5}, 0.1) for w in (0, 1)]
    assert sorted(board.wait_ready(0, 5)) == [0, 1]
    board.release(0, stop=True, learning_rate=0.05)
    for thread, out in waiting:
        thread.join(5)
        assert out["value"] == {"stop": True, "learning_rate": 0.05}


def test_a_failure_wakes_every_waiter_with_an_error():
    board = make_board()
    thread, out = in_thread(board.arrive, 0, 0, 10, {}, False)
    board.fail("Worker 1 failed: boom")
    thread.join(5)
    assert isinstance(out["error"], RoundClosedError) and "boom" in str(out["error"])


def test_double_arrival_and_ready_before_arrival_are_refused():
    board = make_board(workers=1)
    board.arrive(0, 0, 10, {}, False)
    with pytest.raises(ParameterServerError, match="already ended epoch 0") as exc:
        board.arrive(0, 0, 10, {}, False)
    assert exc.value.status == 409
    with pytest.raises(ParameterServerError, match="before ending it"):
        board.ready(0, 1, 0, {}, None)
    with pytest.raises(ParameterServerError, match=r"Worker id must be in \[0, 1\)"):
        board.report_progress(3, 0, 1, 1, {})


def test_progress_counts_samples_across_epochs_and_a_nan_loss_requests_a_stop():
    board = make_board(terminate_on_nan=True)
    board.report_progress(0, 0, 100, 4, {"loss": 1.0}, ["WARNING x: careful"])
    board.report_progress(0, 0, 300, 12, {"loss": 0.5})
    board.report_progress(0, 1, 50, 2, {"loss": 0.4})
    progress = board.progress()[0]
    assert progress.total_samples == 350 and progress.epoch == 1 and progress.reports == 3
    assert board.take_logs() == [(0, "WARNING x: careful")] and board.take_logs() == []
    assert not board.store.stop_requested
    board.report_progress(1, 0, 10, 1, {"loss": float("nan")})
    assert board.store.stop_requested


def test_a_stop_request_completes_open_rounds_with_the_center():
    store = ParameterStore(np.zeros(8, np.float32), SHAPES, 2, barrier_timeout=30)
    thread, out = in_thread(store.barrier, 0, 0, np.ones(8, np.float32), 5)
    store.wait_for_arrivals(0, 1, 5)
    store.request_stop()
    thread.join(5)
    # the center, not a half-filled average
    np.testing.assert_array_equal(out["value"], np.zeros(8))
    # later rounds too
    np.testing.assert_array_equal(store.barrier(1, 1, np.ones(8, np.float32), 5), np.zeros(8))


@pytest.fixture
def served(no_leaked_threads):
    secret = new_secret()
    store = ParameterStore(np.arange(8, dtype=np.float32), SHAPES, num_workers=1)
    board = EpochBoard(store, 1)
    with ParameterServer(
        store, ServerConfig(secret, view_token="view-token"), board=board
    ) as server:
        server.secret = secret
        yield server


def test_epoch_routes_over_a_real_socket(served):
    with ParameterClient(served.url, served.secret, 0, timeout=30) as worker:
        assert worker.post_json(
            "/v1/progress", {"epoch": 0, "samples": 8, "steps": 1, "metrics": {"loss": 2.0}}
        ) == {"recorded": True}
        center = worker.end_epoch(0, 8, {"loss": 2.0}, center=True)
        np.testing.assert_array_equal(center, np.arange(8))
        served.board.release(0, stop=False, learning_rate=0.5)
        assert worker.post_json(
            "/v1/epochs/0/ready", {"rows": 0, "scores": {}, "learning_rate": 0.1}
        ) == {"stop": False, "learning_rate": 0.5}
        # The weights connection and the control connection keep separate sequences.
        flat, _ = worker.pull()
        np.testing.assert_array_equal(flat, np.arange(8))


@pytest.mark.parametrize(
    "path,payload,message",
    [
        ("/v1/progress", [1, 2], "JSON object"),
        (
            "/v1/progress",
            {"epoch": -1, "samples": 1},
            "`epoch` must be an integer from 0 to 2**53 - 1",
        ),
        (
            "/v1/progress",
            {"epoch": 0, "samples": 1, "metrics": {"loss": "high"}},
            "names to numbers",
        ),
        ("/v1/progress", {"epoch": 0, "samples": 1, "logs": "not a list"}, "list of strings"),
        ("/v1/epochs/0/ready", {"rows": 0, "learning_rate": "fast"}, "finite number"),
    ],
)
def test_malformed_control_requests_get_400(served, path, payload, message):
    with ParameterClient(served.url, served.secret, 0, timeout=30) as worker:
        status, _, data = worker.request(
            "POST", path, json.dumps(payload).encode(), "application/json"
        )
    assert status == 400 and message in json.loads(data)["error"]


def test_view_token_opens_only_the_read_only_routes(served):
    import urllib.error
    import urllib.request

    page = urllib.request.urlopen(f"{served.url}/v1/dashboard?token=view-token", timeout=10)
    assert page.headers.get_content_type() == "text/html"
    stats = json.loads(
        urllib.request.urlopen(f"{served.url}/v1/stats?token=view-token", timeout=10).read()
    )
    assert "live" in stats and stats["updates"] == 0
    for url in (
        f"{served.url}/v1/stats?token=wrong",
        f"{served.url}/v1/weights?token=view-token",
        f"{served.url}/v1/dashboard",
    ):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
    assert served.dashboard_url == f"{served.url}/v1/dashboard?token=view-token"


def test_stats_page_json_holds_no_nan():
    board = make_board()
    board.report_progress(0, 0, 10, 1, {"loss": float("nan"), "accuracy": 0.5})
    board.report_progress(1, 0, 10, 1, {"loss": 0.7})
    board.epoch_logs.append({"epoch": 1, "loss": float("inf")})
    text = json.dumps(board.stats(), allow_nan=False)  # raises on NaN or Inf
    figures = json.loads(text)
    assert figures["workers"]["0"]["metrics"] == {"loss": None, "accuracy": 0.5}
    assert (
        figures["workers"]["0"]["loss_over_time"] == []
        and len(figures["workers"]["1"]["loss_over_time"]) == 1
    )
    assert figures["epochs"] == [{"epoch": 1, "loss": None}]


def test_a_wait_that_expires_names_the_setting_that_bounds_it():
    import socket

    from kerasonspark import ConfigurationError

    with socket.socket() as silent:  # accepts the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        client = ParameterClient(
            f"http://127.0.0.1:{silent.getsockname()[1]}",
            b"s" * 32,
            0,
            timeout=0.5,
            timeout_name="epoch_timeout",
        )
        with pytest.raises(
            ParameterServerError, match=r"within 0.5 s: the wait `epoch_timeout` allows expired"
        ):
            client.post_json("/v1/epochs/0/ready", {})
        client.close()
    for name in ("restart_timeout", "registration_timeout", "epoch_timeout"):
        with pytest.raises(ConfigurationError, match=name):
            FailureConfig(**{name: 0})


def test_a_worker_joins_a_stage_once_so_a_spark_retry_of_the_stage_is_refused():
    board = make_board()
    board.join(0, "stage-a")
    board.join(1, "stage-a")
    with pytest.raises(
        ParameterServerError, match="Spark ran worker 1's task of this training stage again"
    ) as again:
        board.join(1, "stage-a")
    assert again.value.status == 409
    board.join(1, "stage-b")  # the trainer's own restart is a new stage
