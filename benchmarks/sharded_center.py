"""``sync``'s seconds per exchange with the driver-hosted center and the sharded one, on 2 to 6
emulated hosts whose links are shaped to 1 Gbit/s and 100 Mbit/s.

    python benchmarks/sharded_center.py [--hosts 2 3 4 6] [--rates 1gbit 100mbit] [--rounds 40]

Needs root and iproute2. For each host count N it starts a Spark standalone cluster on N + 1
emulated hosts (``emulated_cluster.py``: the driver in the first, one worker of one core in each
of the others), shapes every host's link with ``tc tbf``, and trains one epoch of ``--rounds``
rounds per worker, ``sync_every=1``, with each center in turn. The model is one dense layer of
1,059,850 parameters (4.2 MB, the reference CNN's size) on batches of 8 rows: compute is small,
the exchange is what is measured. Prints, per run, the mean seconds per exchange over the
workers (``exchange_seconds / rounds``), samples per second of the slowest worker, and the bytes
each link carried per round: the driver's (in + out) and the busiest worker's.

Then the model (:func:`predicted_exchange`), against every measurement: a round moves ``M`` bytes
(the model) through links of the measured TCP goodput ``B`` (a bulk transfer between two hosts at
each rate), plus ``o``, the CPU a round costs a worker (copies, encoding, the averaging), which
the ``N`` workers' processes share with each other on this machine's cores:

- driver-hosted: every worker's weights in through the driver's link, then every average out,
  ``o(N) + 2 N M / B``;
- sharded: each worker sends ``(N - 1) / N`` of its weights to the peers while its own shard
  receives as much, then the averages go back the same way, ``o(N) + 2 (N - 1) / N * M / B``;

with ``o(N) = o * max(1, N / cores)``, ``o`` calibrated once per center on the 2-host, 1 Gbit/s
run; every other point is a prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from pathlib import Path

from emulated_cluster import driver_session, emulated_cluster, run_driver
from emulated_hosts import goodput

CENTERS = ("driver", "sharded")
BATCH = 8
FEATURES = 1024
MODEL_BYTES = 4 * (FEATURES * FEATURES + FEATURES + FEATURES * 10 + 10)


def dense_model():  # -> keras.Model
    """A 1024 x 1024 dense layer, then softmax over 10: the CNN's size with little compute."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(FEATURES, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    return model


def drive(master: str, address: str, workers: int, rounds: int, centers: list[str]) -> None:
    """In the driver's namespace: one run per center, one ``RUN {json}`` line each."""
    import numpy as np

    from kerasonspark import SparkTrainer

    spark = driver_session(master, address, "kerasonspark-sharded-center")
    rng = np.random.default_rng(0)
    rows = workers * rounds * BATCH
    x = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    y = rng.integers(0, 10, rows)
    for center in centers:
        trainer = SparkTrainer(
            dense_model(),
            backend="sync",
            num_workers=workers,
            spark=spark,
            epochs=1,
            batch_size=BATCH,
            verbose=0,
            backend_options={"sync_every": 1, "center": center},
        )
        stats = trainer.fit(x, y).stats
        reports = stats["workers"]
        slowest = max(reports, key=lambda r: r["seconds"])
        server = stats["parameter_server"]
        busiest = max(
            reports,
            key=lambda r: r["mb_sent"] + r.get("shard_mb_out", 0.0),
        )
        line = {
            "center": stats["sync"]["center"],
            "workers": workers,
            "rounds": slowest["rounds"],
            "exchange_seconds": statistics.mean(
                r["exchange_seconds"] / r["rounds"] for r in reports
            ),
            "samples_per_second": sum(r["samples"] for r in reports) / slowest["seconds"],
            "driver_mb_per_round": (server["mb_in"] + server["mb_out"]) / slowest["rounds"],
            "worker_mb_out_per_round": (busiest["mb_sent"] + busiest.get("shard_mb_out", 0.0))
            / busiest["rounds"],
            "worker_mb_in_per_round": (busiest["mb_received"] + busiest.get("shard_mb_in", 0.0))
            / busiest["rounds"],
        }
        print("RUN " + json.dumps(line), flush=True)
    spark.stop()


def predicted_exchange(center: str, workers: int, goodput: float, cpu: float, cores: int) -> float:
    """Seconds per exchange of ``workers`` workers through links of ``goodput`` bytes/s, ``cpu``
    seconds of a worker's own work per round when it has a core to itself."""
    shared = cpu * max(1.0, workers / cores)
    if center == "driver":
        return shared + 2 * workers * MODEL_BYTES / goodput
    return shared + 2 * (workers - 1) / workers * MODEL_BYTES / goodput


def report(runs: list[dict], goodputs: dict[str, float], cores: int) -> None:
    """Measured against predicted seconds per exchange, every run; the table by host count."""
    calibration = {
        run["center"]: run
        for run in runs
        if run["workers"] == min(r["workers"] for r in runs) and run["rate"] == runs[0]["rate"]
    }
    cpu = {
        center: max(
            run["exchange_seconds"]
            - predicted_exchange(center, run["workers"], goodputs[run["rate"]], 0, cores),
            0.0,
        )
        * min(1.0, cores / run["workers"])
        for center, run in calibration.items()
    }
    print(
        "\nLink goodput (MB/s): "
        + ", ".join(f"{rate} {value / 1e6:.0f}" for rate, value in goodputs.items())
        + "; CPU per round (s, calibrated at "
        + f"{runs[0]['workers']} hosts, {runs[0]['rate']}): "
        + ", ".join(f"{center} {value:.4f}" for center, value in cpu.items())
    )
    print("\n| link | center | hosts | measured s | predicted s | error | samples/s |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for run in sorted(runs, key=lambda r: (r["rate"], r["center"], r["workers"])):
        predicted = predicted_exchange(
            run["center"], run["workers"], goodputs[run["rate"]], cpu[run["center"]], cores
        )
        error = predicted / run["exchange_seconds"] - 1
        if run is not calibration.get(run["center"]):
            worst = max(worst, abs(error))
        print(
            f"| {run['rate']} | {run['center']} | {run['workers']} | "
            f"{run['exchange_seconds']:.3f} | {predicted:.3f} | {error:+.1%} | "
            f"{run['samples_per_second']:,.0f} |"
        )
    print(f"\nLargest error of a prediction: {worst:.1%}")
    hosts = sorted({run["workers"] for run in runs})
    table: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        table[run["rate"], run["center"]][run["workers"]].append(run["exchange_seconds"])
    print("\nseconds per exchange (median over repeats)\n")
    print("| link | center | " + " | ".join(f"N={n}" for n in hosts) + " | N=max / N=min |")
    print("|---|---|" + "---|" * (len(hosts) + 1))
    for (rate, center), by_n in sorted(table.items()):
        values = [statistics.median(by_n[n]) for n in hosts if by_n.get(n)]
        cells = " | ".join(f"{v:.3f}" for v in values)
        print(f"| {rate} | {center} | {cells} | {values[-1] / values[0]:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[2, 3, 4, 6])
    parser.add_argument("--rates", nargs="+", default=["1gbit", "100mbit"])
    parser.add_argument("--rounds", type=int, default=40, help="rounds per run")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every point, interleaved")
    parser.add_argument("--out", help="write every run to this JSON file")
    parser.add_argument("--from", dest="source", help="report the runs of this JSON file")
    parser.add_argument("--drive", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        master, address, workers, rounds, centers = args.drive
        drive(master, address, int(workers), int(rounds), centers.split(","))
        return
    if args.source:
        measured = json.loads(Path(args.source).read_text())
        report(measured["runs"], measured["goodput"], measured.get("cores", os.cpu_count() or 1))
        return
    runs: list[dict] = []
    goodputs: dict[str, float] = {}
    for hosts in args.hosts:
        with emulated_cluster(workers=hosts, memory="1500m") as (network, cluster):
            driver_host = network.hosts[0]
            for repeat in range(args.repeat):
                for rate in args.rates:
                    network.shape(None if rate == "none" else rate)
                    if rate not in goodputs:
                        goodputs[rate] = goodput(network.hosts[1], network.hosts[2])
                    for line in run_driver(
                        driver_host,
                        __file__,
                        cluster.master_url,
                        driver_host.address,
                        str(hosts),
                        str(args.rounds),
                        ",".join(CENTERS),
                    ):
                        line.update(rate=rate, repeat=repeat)
                        runs.append(line)
                        print(
                            f"{hosts} hosts, {rate}, {line['center']}: "
                            f"{line['exchange_seconds']:.3f} s per exchange, "
                            f"{line['samples_per_second']:,.0f} samples/s, driver "
                            f"{line['driver_mb_per_round']:.1f} MB/round, busiest worker out "
                            f"{line['worker_mb_out_per_round']:.1f} MB/round",
                            flush=True,
                        )
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": runs, "goodput": goodputs}, indent=1))
    report(runs, goodputs, os.cpu_count() or 1)


if __name__ == "__main__":
    main()
