"""The README's main command, end to end on a tiny MNIST written by the test."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kerasonspark.cli import main

from test_datasets import write_idx

ROOT = Path(__file__).resolve().parents[1]


def test_backends_lists_every_engine(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    for name in ("async", "hogwild", "single", "sync"):
        assert name in out


def write_tiny_mnist(folder: Path) -> None:
    """400 training and 100 test images: each digit a bright square at a place given by its
    class."""
    rng = np.random.default_rng(0)
    labels = {
        "train": rng.integers(0, 10, 400, dtype=np.uint8),
        "t10k": rng.integers(0, 10, 100, dtype=np.uint8),
    }
    for prefix, y in labels.items():
        x = rng.integers(0, 40, (len(y), 28, 28), dtype=np.uint8)
        for i, label in enumerate(y):
            row, col = divmod(int(label), 5)
            x[i, 4 + row * 12 : 12 + row * 12, 1 + col * 5 : 5 + col * 5] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)


@pytest.mark.spark
def test_compare_trains_every_strategy_on_the_same_data_and_writes_a_table(spark, tmp_path, capsys):
    # In this process, on the running session (which `compare` leaves running): the command's own
    # process start is what test_mnist_example covers.
    from kerasonspark.cli import main

    write_tiny_mnist(tmp_path)
    figures, picture = tmp_path / "figures.json", tmp_path / "compare.png"
    strategies = ["single", "sync", "async:downpour", "elephas:hogwild"]
    assert (
        main(
            [
                "compare",
                "--data",
                str(tmp_path),
                "--backends",
                *strategies,
                "--epochs",
                "2",
                "--batch-size",
                "16",
                "--options",
                '{"elephas:hogwild": {"frequency": "epoch"}}',
                "--json",
                str(figures),
                "--plot",
                str(picture),
                "--target",
                "0.5",
            ]
        )
        == 0
    )
    rows = {row["strategy"]: row for row in json.loads(figures.read_text())}
    assert list(rows) == strategies
    assert rows["single"]["vs_single"] == 1.0 and rows["sync"]["vs_single"] > 0
    assert all(row["test_accuracy"] > 0.5 and row["runs"] == 1 for row in rows.values())
    assert rows["single"]["exchanges"] == 0
    assert rows["sync"]["exchanges"] > 0 and rows["async:downpour"]["exchanges"] > 0
    # frequency "epoch": one push per worker and epoch
    assert rows["elephas:hogwild"]["exchanges"] == 2 * 2
    # the initial model at 0 s, points within epochs, the model at each epoch's end
    for row in rows.values():
        (curve,) = row["curves"]
        ends = [p for p in curve if float(p["epoch"]).is_integer()]
        assert [p["epoch"] for p in ends] == [0, 1, 2] and curve[0]["seconds"] == 0.0
        seconds = [p["seconds"] for p in curve]
        assert seconds == sorted(seconds) and seconds[-1] <= row["wall_s"] + 1e-6
        assert ends[2]["test_accuracy"] == row["test_accuracy"] and ends[0]["test_accuracy"] < 0.5
        assert row["accuracy_by_epoch"] == [ends[1]["test_accuracy"], ends[2]["test_accuracy"]]
        assert row["target"] == 0.5 and 0 < row["seconds_to_target"] <= row["wall_s"]
    # single gets a point at each quarter of an epoch (25 steps of 16 rows: at steps 7, 13 and 19)
    assert [p["epoch"] for p in rows["single"]["curves"][0]] == [
        0,
        0.28,
        0.52,
        0.76,
        1,
        1.28,
        1.52,
        1.76,
        2,
    ]
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 20_000
    output = capsys.readouterr().out.splitlines()
    table = [line for line in output if line.startswith("| `")]
    assert [line.split("`")[1] for line in table] == strategies
    assert (
        "accuracy by epoch"
        in output[output.index(next(line for line in output if line.startswith("| strategy")))]
    )
    assert spark.range(3).count() == 3  # the session still runs


def test_compare_refuses_an_unknown_strategy_before_training(spark):
    from kerasonspark import ConfigurationError, compare_strategies

    from conftest import small_model

    runs = []
    with pytest.raises(ConfigurationError, match="Unknown backend 'nope'"):
        compare_strategies(
            small_model, spark, None, None, ["sync", "nope"], on_run=lambda *run: runs.append(run)
        )
    assert runs == []  # `sync` never started: the typo was caught first


@pytest.mark.spark
def test_compare_runs_each_strategy_at_each_worker_count_and_single_once(spark, tmp_path, capsys):
    from kerasonspark.cli import main

    write_tiny_mnist(tmp_path)
    figures = tmp_path / "figures.json"
    assert (
        main(
            [
                "compare",
                "--data",
                str(tmp_path),
                "--backends",
                "single",
                "sync",
                "--workers",
                "1",
                "2",
                "--batch-size",
                "16",
                "--json",
                str(figures),
            ]
        )
        == 0
    )
    rows = [(row["strategy"], row["workers"]) for row in json.loads(figures.read_text())]
    assert rows == [("single", None), ("sync", 1), ("sync", 2)]
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert [line.split(" | ")[1] for line in table] == ["-", "1", "2"]  # the workers column


def test_the_table_shows_medians_single_s_range_and_seconds_to_target():
    from kerasonspark import StrategyRow, format_table

    def run(speed, accuracy):
        return {
            "samples_per_s": speed,
            "samples_per_wall_s": speed / 2,
            "train_s": 1.0,
            "wall_s": 2.0,
            "test_accuracy": accuracy,
            "exchanges": 0,
            "overlapping_writes": 0,
            "max_staleness": 0,
        }

    def curve(seconds_at_target):  # reaches 0.9 at the given second, or never (None)
        return [
            {"seconds": 0.0, "epoch": 0, "test_accuracy": 0.1},
            {"seconds": 5.0, "epoch": 0.5, "test_accuracy": 0.5},
            {
                "seconds": seconds_at_target or 9.0,
                "epoch": 1,
                "test_accuracy": 0.95 if seconds_at_target else 0.8,
            },
        ]

    single = StrategyRow(
        "single",
        [run(1000, 0.9), run(3000, 0.95), run(2000, 0.92)],
        curves=[curve(8), curve(6), curve(7)],
    )
    sync = StrategyRow(
        "sync", [run(4000, 0.9)] * 3, curves=[curve(None), curve(None), curve(4)], workers=2
    )
    lines = format_table([single, sync], target=0.9).splitlines()
    # whole-fit samples/s: median (range) for single only
    assert lines[2].split(" | ")[4] == "1,000 (500-1,500)"
    assert lines[3].split(" | ")[4] == "2,000"
    # 2 of 3 runs never did
    assert lines[2].split(" | ")[-2] == "7.0" and lines[3].split(" | ")[-2] == "not reached"
    assert single.accuracy_by_epoch() == [0.95]


def run_processes() -> set[int]:
    """Processes a Spark run leaves behind if stopped badly: daemons, executors, Python workers."""
    markers = (
        b"org.apache.spark.deploy",
        b"CoarseGrainedExecutorBackend",
        b"pyspark.daemon",
        b"pyspark/daemon",
    )
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and any(m in (entry / "cmdline").read_bytes() for m in markers):
                found.add(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.spark
def test_mnist_example_prints_the_three_2017_lines_and_stops_the_cluster_it_started(tmp_path):
    # The README's main command with `--cluster`: the same script and `train` path as without it,
    # plus a standalone cluster of its own that must be gone afterwards.
    write_tiny_mnist(tmp_path)
    before = run_processes()
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "mnist.py"),
            "--data",
            str(tmp_path),
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "-o",
            "sync_every=5",
            "--cluster",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Started a standalone cluster of 1 worker at spark://127.0.0.1:" in run.stdout
    lines = [
        line
        for line in run.stdout.splitlines()
        if line.split(":")[0] in ("Training time", "Test accuracy", "Parameter-server updates")
    ]
    assert len(lines) == 3, run.stdout
    accuracy = float(lines[1].split(":")[1])
    rounds = int(lines[2].split(":")[1])
    assert accuracy > 0.5  # an untrained model scores about 0.1
    # one worker (--cluster 1): 2 epochs of ceil(ceil(400 rows / 16) / 5) = 5 rounds
    assert rounds == 2 * 5
    assert run_processes() - before == set()
