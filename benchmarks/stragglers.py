"""What a slow host costs each engine, and what ``balance_workers`` wins back.

    python benchmarks/stragglers.py --data ../shared/data/mnist [--rows 8000] [--epochs 3] \\
        [--quota 0.5]

On three emulated hosts (``emulated_cluster.py``: the driver and master in one, a Spark worker
with one core in each of the others; as root), trains the reference CNN with ``sync``, ``async``
and ``hogwild`` on 2 workers three ways: both hosts at full speed; the second worker's host held
to ``--quota`` of a core (a CPU cgroup around its Spark worker daemon, which its executor and
Python workers inherit); and slow again with ``balance_workers=True``. Prints, per engine and
way, samples/s over the whole fit, the test accuracy on 2,000 test images, and each worker's
steps in the last epoch.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from emulated_cluster import BATCH, driver_session, emulated_cluster, run_driver

from kerasonspark import DataConfig

ENGINES = ["sync", "async", "hogwild"]
# cgroup v1's cpu controller, as on this machine
CGROUP = Path("/sys/fs/cgroup/cpu/kerasonspark-straggler")
PERIOD_US = 100_000


def hold_to(quota: float | None) -> None:
    """Cap the cgroup's processes at ``quota`` of a core (``None``: no cap)."""
    (CGROUP / "cpu.cfs_quota_us").write_text(str(-1 if quota is None else int(quota * PERIOD_US)))


def drive(
    master: str, address: str, data: str | None, rows: int, epochs: int, balance: bool, way: str
) -> None:
    """In the driver's host: train each engine once; one RUN line each."""
    from kerasonspark import SparkTrainer, load_mnist, mnist_cnn

    spark = driver_session(master, address, "kerasonspark-stragglers")
    (x, y), (x_test, y_test) = load_mnist(data)
    for engine in ENGINES:
        trainer = SparkTrainer(
            mnist_cnn(seed=0),
            backend=engine,
            num_workers=2,
            spark=spark,
            epochs=epochs,
            batch_size=BATCH,
            verbose=0,
            seed=0,
            data=DataConfig(balance_workers=balance),
        )
        stats = trainer.fit(x[:rows], y[:rows]).stats
        last = [
            r.get("balanced_steps", [None])[-1]
            for r in sorted(stats["workers"], key=lambda r: r["worker"])
        ]
        print(
            "RUN "
            + json.dumps(
                {
                    "engine": engine,
                    "way": way,
                    "samples_per_second": stats["samples_per_second"],
                    "accuracy": trainer.evaluate(x_test[:2000], y_test[:2000])["accuracy"],
                    "last_epoch_steps": last,
                    "worker_seconds": [round(r["seconds"], 1) for r in stats["workers"]],
                }
            ),
            flush=True,
        )
    spark.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default=None, help="MNIST folder (default: the standard locations)"
    )
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quota", type=float, default=0.5, help="the slow host's share of a core")
    parser.add_argument("--drive", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        master, address, data, rows, epochs, balance = args.drive
        drive(master, address, data or None, int(rows), int(epochs), balance == "balanced", balance)
        return
    runs = []
    CGROUP.mkdir(exist_ok=True)
    try:
        with emulated_cluster(workers=2) as (network, cluster):
            assert cluster.state is not None
            # master, worker 0, worker 1
            (CGROUP / "cgroup.procs").write_text(str(cluster.state.pids[2]))
            driver_host = network.hosts[0]
            for way, quota in (("even", None), ("slow", args.quota), ("balanced", args.quota)):
                hold_to(quota)
                runs += run_driver(
                    driver_host,
                    __file__,
                    cluster.master_url,
                    driver_host.address,
                    args.data or "",
                    str(args.rows),
                    str(args.epochs),
                    way,
                )
                for run in runs[-len(ENGINES) :]:
                    print(json.dumps(run), flush=True)
    finally:
        hold_to(None)
        # back to the root group, so the group can go
        for pid in (CGROUP / "cgroup.procs").read_text().split():
            Path("/sys/fs/cgroup/cpu/cgroup.procs").write_text(pid)
        os.rmdir(CGROUP)
    print(
        f"\n{args.rows} rows, {args.epochs} epochs, 2 workers; the slow host held to "
        f"{args.quota:g} of a core.\n"
    )
    print(
        "| engine | both hosts at full speed | one slow host | one slow host, balance_workers | "
        "steps in the last epoch (balanced) |"
    )
    print("|---|---|---|---|---|")
    for engine in ENGINES:
        row = {run["way"]: run for run in runs if run["engine"] == engine}
        cells = [
            f"{row[w]['samples_per_second']:,.0f} samples/s, {row[w]['accuracy']:.4f}"
            for w in ("even", "slow", "balanced")
        ]
        print(
            f"| `{engine}` | " + " | ".join(cells) + f" | {row['balanced']['last_epoch_steps']} |"
        )


if __name__ == "__main__":
    main()
