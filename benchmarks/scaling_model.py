"""How the engines scale on slower networks: measured on emulated hosts, then modelled.

    python benchmarks/scaling_model.py --data ../shared/data/mnist [--rows 8000] [--repeat 3] \\
        [--out scaling.json]
    python benchmarks/scaling_model.py --from scaling.json     # the model again, without measuring
    python benchmarks/scaling_model.py --data ../shared/data/mnist --configs async \\
        --rates none 100mbit --rows 32000

Measures (as root, with iproute2) on three emulated hosts (``emulated_cluster.py``): the driver
with the Spark master and the parameter server in one, a Spark worker (1 core) in each of the
others, every host's link shaped with ``tc tbf`` to 10 Gbit/s, 1 Gbit/s, 100 Mbit/s or left as it
is. At each rate it measures the link's goodput with a bulk TCP transfer of the reference CNN's 4.2
MB, then trains the reference CNN (1 epoch of ``--rows`` MNIST rows, 8,000 by default, batch 32,
default options) with ``sync``, ``async``, ``async`` with bfloat16 deltas, and ``hogwild``, on 1 and
on 2 workers, and records each worker's compute and exchange seconds and bytes.

The model (:func:`predict`) reads a run as rounds of ``steps`` local steps then one exchange:

- compute: ``steps * batch * c``, with ``c`` the seconds per sample of one worker, and a client
  cost per exchange ``o`` (encoding, HTTP, copying weights in and out); both are CPU work, and
  on 2 workers sharing this machine's 2 cores with the driver both are slower by the same factor,
  calibrated once from the unshaped 2-worker runs;
- the driver's link, full duplex at the measured goodput ``B``: every worker's upload goes
  through its inbound side, every download through its outbound side, one after another;
- the server's apply ``a`` per push (measured in process), serial under the lock (``async``,
  ``sync``), concurrent for ``hogwild``.

``sync`` is a barrier per round: ``T = compute + o + N*a + N*up/B + N*down/B``. The asynchronous
engines are a closed queueing network (N workers cycling through compute and the driver's link
and lock), solved exactly by mean-value analysis (Reiser & Lavenberg 1980), after a first cycle in
which the workers, started together by the training stage, all exchange at once
(:func:`in_phase_seconds`). ``c`` (one for all
engines) and each engine's ``o`` come from the unshaped runs; every shaped run is a prediction,
checked against its measurement (the unshaped ones are shown too: their error is the model's fit).
The projection to 4-256 workers gives each worker its own machine (no CPU sharing)
and the driver one link of 1, 10 or 25 Gbit/s at the goodput TCP reached through the 1 Gbit/s
shaper; beside the driver-hosted center it projects the sharded one (:func:`predict_sharded`,
whose exchange ``benchmarks/sharded_center.py`` measures on 2 to 6 emulated hosts), where each
worker's link is its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from emulated_cluster import BATCH, driver_session, emulated_cluster, run_driver

RATES = ["none", "10gbit", "1gbit", "100mbit"]
CONFIGS = {  # name -> (backend, options)
    "sync": ("sync", {"center": "driver"}),
    # the driver-hosted sync's costs, exchanged through a center sharded over the workers
    "sync-sharded": ("sync", {"center": "sharded"}),
    "async": ("async", {}),
    "async-sharded": ("async", {"center": "sharded"}),
    "async-sharded-overlap": ("async", {"center": "sharded", "overlap": True}),
    "async-bf16": ("async", {"delta_dtype": "bfloat16"}),
    "hogwild": ("hogwild", {}),
}
PROJECTED_WORKERS = [4, 8, 16, 32, 64, 128, 256]
PROJECTED_LINKS = [1, 10, 25]  # Gbit/s


# --- the model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Costs:
    """What one exchange of one engine costs, in seconds and bytes."""

    steps: float  # local steps between exchanges
    compute: float  # c: seconds per sample of one worker with a core of its own
    client: float  # o: the worker's own seconds per exchange besides the link and the server
    apply: float  # a: the server's seconds per push (a round's apply counts one per worker)
    up: float  # bytes a worker sends per exchange
    down: float  # bytes it receives
    serial_apply: bool = True  # pushes apply one at a time (False: hogwild)
    barrier: bool = False  # sync: every worker waits for the round
    sharded: bool = False  # the center is sharded over the workers (see predict_sharded)
    overlap: bool = False  # a sharded exchange travels while the next window computes


def predict(
    costs: Costs,
    workers: int,
    goodput: float,
    slowdown: float = 1.0,
    exchanges: float | None = None,
) -> float:
    """Samples per second of ``workers`` workers over a driver link of ``goodput`` bytes/s.

    ``slowdown`` multiplies every CPU cost (compute, client, apply): >1 where workers share cores.
    ``exchanges``: each worker's exchanges in the run, for an asynchronous engine's start-up (see
    :func:`in_phase_seconds`); ``None`` for the steady state alone.
    """
    if costs.sharded:
        return predict_sharded(costs, workers, goodput, costs.overlap, slowdown)
    think = costs.steps * BATCH * costs.compute * slowdown + costs.client * slowdown
    apply = costs.apply * slowdown
    inbound, outbound = costs.up / goodput, costs.down / goodput
    samples_per_exchange = costs.steps * BATCH
    if costs.barrier:
        round_seconds = think + workers * (apply + inbound + outbound)
        return workers * samples_per_exchange / round_seconds
    stations = [inbound, outbound] + ([apply] if costs.serial_apply else [])
    if not costs.serial_apply:
        think += apply
    queued = [0.0] * len(stations)
    throughput = 0.0
    for n in range(1, workers + 1):  # exact mean-value analysis of the closed network
        residence = [demand * (1 + q) for demand, q in zip(stations, queued, strict=True)]
        throughput = n / (think + sum(residence))
        queued = [throughput * r for r in residence]
    if exchanges is None or workers == 1 or exchanges <= 1:
        return throughput * samples_per_exchange
    steady = workers / throughput  # seconds of one worker's cycle
    first = in_phase_seconds(think, stations, workers)
    return workers * samples_per_exchange * exchanges / (first + (exchanges - 1) * steady)


def predict_sharded(
    costs: Costs, workers: int, goodput: float, overlap: bool = False, slowdown: float = 1.0
) -> float:
    """Samples per second of ``workers`` workers, each on a machine of its own with a link of
    ``goodput`` bytes/s, exchanging through a center sharded over them
    (``benchmarks/sharded_center.py`` checks the exchange's part on emulated hosts).

    A worker's exchange sends ``(N - 1) / N`` of what it sends the driver today to its peers and
    receives as much back, full duplex; its own shard applies every worker's part of an exchange,
    ``a`` in all; no link or lock is shared by all workers, so nothing queues as N grows. With
    ``overlap`` (the asynchronous engines' option) the exchange travels while the next window
    computes: a cycle is the longer of the two.
    """
    think = (costs.steps * BATCH * costs.compute + costs.client) * slowdown
    exchange = costs.apply * slowdown + (costs.up + costs.down) * (workers - 1) / workers / goodput
    cycle = max(think, exchange) if overlap else think + exchange
    return workers * costs.steps * BATCH / cycle


def in_phase_seconds(think: float, stations: list[float], workers: int) -> float:
    """One cycle of workers that exchange at the same moment: the first of a training stage, which
    starts every worker together. TCP shares the driver's link fairly among the transfers (and the
    lock takes the pushes one by one), so each waits for all of them: ``think + N * demands``.
    The mean-value analysis assumes workers in random phase; a run of few exchanges per worker ends
    before they drift apart (measured: 6.5 exchanges per worker on 100 Mbit/s, 24 % below the
    steady state; 26 exchanges, 4 %)."""
    return think + workers * sum(stations)


def limit_workers(costs: Costs, goodput: float) -> float:
    """Where adding workers stops paying. Asynchronous engines: the worker count past which the
    busiest shared station (the driver's link or the lock) caps the throughput, ``(think + total
    demand) / largest demand`` (the asymptotic bound of the closed network). ``sync``: the count
    at which a round's exchanges take as long as its compute (efficiency below one half)."""
    think = costs.steps * BATCH * costs.compute + costs.client
    stations = [costs.up / goodput, costs.down / goodput, costs.apply]
    if costs.barrier:
        return think / sum(stations)
    if not costs.serial_apply:
        think, stations = think + costs.apply, stations[:2]
    return (think + sum(stations)) / max(stations)


def calibrate(runs: list[dict], apply_seconds: dict[str, float]) -> tuple[dict[str, Costs], float]:
    """Each engine's :class:`Costs` from the unshaped runs: one compute time per sample for every
    engine (the same model and batch; the mean of the 1-worker runs), each engine's client cost
    from its own 1-worker exchange time less the link and the apply, and the CPU slowdown of two
    workers on this machine (the mean compute per sample of the 2-worker runs over the
    1-worker's)."""
    unshaped = [run for run in runs if run["rate"] == "none"]
    per_sample = {
        n: [run["compute_per_sample"] for run in unshaped if run["workers"] == n] for n in (1, 2)
    }
    compute = sum(per_sample[1]) / len(per_sample[1])
    costs: dict[str, Costs] = {}
    for run in unshaped:
        if run["workers"] != 1:
            continue
        backend = CONFIGS[run["config"]][0]
        link = (run["up_bytes"] + run["down_bytes"]) / run["goodput"]
        costs[run["config"]] = Costs(
            steps=run["steps_per_exchange"],
            compute=compute,
            client=max(run["exchange_seconds"] - link - apply_seconds[backend], 0.0),
            apply=apply_seconds[backend],
            up=run["up_bytes"],
            down=run["down_bytes"],
            serial_apply=backend != "hogwild",
            barrier=backend == "sync",
        )
    for name, (backend, options) in CONFIGS.items():
        # a sharded center's costs are the driver-hosted ones (its 1-worker run exchanges
        # nothing over a link: it has no peer)
        if options.get("center") == "sharded" and name in costs:
            plain = {k: v for k, v in options.items() if k not in ("center", "overlap")}
            driver = next(
                n
                for n, (b, o) in CONFIGS.items()
                if b == backend
                and n in costs
                and {**o, "center": "driver"} == {**plain, "center": "driver"}
            )
            costs[name] = dataclasses.replace(
                costs[driver], sharded=True, overlap=bool(options.get("overlap"))
            )
    return costs, (sum(per_sample[2]) / len(per_sample[2])) / compute


def report(measured: dict) -> None:
    """Print measured against predicted for every run, then the projection."""
    runs, goodputs = medians(measured["runs"]), measured["goodput"]
    costs, slowdown = calibrate(runs, measured["apply_seconds"])
    print(
        "\nLink goodput (MB/s): "
        + ", ".join(f"{rate} {goodputs[rate] / 1e6:.0f}" for rate in RATES if rate in goodputs)
    )
    print(
        "Calibrated on the unshaped runs (one compute time per sample for all engines; each "
        "engine's client cost\nper exchange); 2 workers on this machine's 2 cores are "
        f"{slowdown:.2f}x slower per sample (CPU shared)."
    )
    print(f"\nMedians of {runs[0]['repeats']} runs each, interleaved.")
    print(
        "\n| engine | workers | link | measured samples/s | predicted | error | exchange s "
        "(measured) |"
    )
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for run in runs:
        c = costs[run["config"]]
        exchanges = measured["rows"] / run["workers"] / (run["steps_per_exchange"] * BATCH)
        predicted = predict(
            c,
            run["workers"],
            goodputs[run["rate"]],
            slowdown if run["workers"] == 2 else 1.0,
            exchanges,
        )
        error = predicted / run["samples_per_second"] - 1
        worst = max(worst, abs(error))
        print(
            f"| {run['config']} | {run['workers']} | {run['rate']} | "
            f"{run['samples_per_second']:,.0f} | {predicted:,.0f} | {error:+.1%} | "
            f"{run['exchange_seconds']:.3f} |"
        )
    print(f"\nLargest error of a prediction: {worst:.1%}")
    if "1gbit" not in goodputs:
        return  # the projection takes TCP's share of a link from the 1 Gbit/s runs
    fraction = goodputs["1gbit"] / (1e9 / 8)
    print(
        "\nProjected efficiency (samples/s over N x one worker's compute-only rate), one machine "
        f"per worker,\nthe driver's link at {fraction:.0%} of its rate (TCP goodput through the 1 "
        "Gbit/s shaper):\n"
    )
    header = " | ".join(f"N={n}" for n in PROJECTED_WORKERS)
    print(f"| engine | center | link | {header} | limit N |")
    print("|---|---|---|" + "---|" * len(PROJECTED_WORKERS) + "---|")
    for name, c in costs.items():
        if c.sharded:
            continue  # projected beside its driver-hosted engine below
        alone = 1 / c.compute
        centers = [("driver", lambda n, g, c=c: predict(c, n, g), True)]
        centers.append(("sharded", lambda n, g, c=c: predict_sharded(c, n, g), False))
        if not c.barrier:
            centers.append(
                ("sharded, overlap", lambda n, g, c=c: predict_sharded(c, n, g, True), False)
            )
        for center, samples_per_second, limited in centers:
            for gbit in PROJECTED_LINKS:
                goodput = gbit * 1e9 / 8 * fraction
                cells = " | ".join(
                    f"{samples_per_second(n, goodput) / (n * alone):.0%}" for n in PROJECTED_WORKERS
                )
                limit = f"{limit_workers(c, goodput):.0f}" if limited else "none"
                print(f"| {name} | {center} | {gbit} Gbit/s | {cells} | {limit} |")
    print(
        "\nsharded: each worker's link carries 2 (N - 1) / N of a model per exchange, whatever N "
        "is; no station\nis shared by all workers, so no N limits it."
    )
    print(
        "\nlimit N: for sync, the workers at which a round's exchanges through the driver's link "
        "take as long as\nits compute (efficiency 1/2); for the asynchronous engines, the "
        "workers past which the driver's link\n(or the lock) is busy all the time and caps "
        "samples/s (more add staleness, not speed)."
    )


# --- measuring -------------------------------------------------------------------------------


def measure_apply_seconds(repeats: int = 20) -> dict[str, float]:
    """The server's seconds per push of the reference CNN, in process: a push under each
    asynchronous engine's default rule, and a worker's share of a ``sync`` round (its arrival plus
    the average)."""
    import numpy as np

    from kerasonspark import MNIST_CNN_PARAMETERS, available_backends
    from kerasonspark.parameter_server._store import ParameterStore

    shapes = [(MNIST_CNN_PARAMETERS,)]
    center = np.zeros(MNIST_CNN_PARAMETERS, np.float32)
    delta = np.random.default_rng(0).normal(size=MNIST_CNN_PARAMETERS).astype(np.float32) * 1e-4
    seconds = {}
    for backend, lock in (("async", True), ("hogwild", False)):
        store = ParameterStore(
            center, shapes, 1, rule=available_backends()[backend]().options.make_rule(), lock=lock
        )
        started = time.perf_counter()
        for _ in range(repeats):
            store.push(0, delta, window=5, samples=160)
        seconds[backend] = (time.perf_counter() - started) / repeats
    store = ParameterStore(center, shapes, 1)
    started = time.perf_counter()
    for round in range(repeats):
        store.barrier(round, 0, delta, samples=256)
    seconds["sync"] = (time.perf_counter() - started) / repeats
    return seconds


def drive(
    master: str, address: str, data: str | None, rows: int, configs: list[str], workers: list[int]
) -> None:
    """In the driver's namespace: train each configuration and print one JSON line per run."""
    from kerasonspark import SparkTrainer, load_mnist, mnist_cnn

    spark = driver_session(master, address, "kerasonspark-scaling-model")
    (x, y), _ = load_mnist(data)
    x, y = x[:rows], y[:rows]
    for name in configs:
        backend, options = CONFIGS[name]
        for n in workers:
            trainer = SparkTrainer(
                mnist_cnn(seed=0),
                backend=backend,
                num_workers=n,
                spark=spark,
                epochs=1,
                batch_size=BATCH,
                verbose=0,
                backend_options=options,
            )
            stats = trainer.fit(x, y).stats
            print("RUN " + json.dumps(run_figures(name, n, stats)), flush=True)
    spark.stop()


def run_figures(name: str, workers: int, stats: dict) -> dict:
    """One run's figures from ``fit``'s stats: per worker means of compute, exchange and bytes."""
    reports = stats["workers"]
    exchanges = [r["rounds"] if CONFIGS[name][0] == "sync" else r["pushes"] for r in reports]
    samples = sum(r["samples"] for r in reports)
    slowest = max(reports, key=lambda r: r["seconds"])  # the epoch boundary waits for it
    return {
        "config": name,
        "workers": workers,
        "samples_per_second": samples / slowest["seconds"],
        "fit_samples_per_second": stats["samples_per_second"],
        # Everything but the exchanges, per sample, of the worker the run waits for.
        "compute_per_sample": (slowest["seconds"] - slowest["exchange_seconds"])
        / slowest["samples"],
        "exchange_seconds": sum(
            r["exchange_seconds"] / e for r, e in zip(reports, exchanges, strict=True)
        )
        / len(reports),
        "steps_per_exchange": sum(r["steps"] / e for r, e in zip(reports, exchanges, strict=True))
        / len(reports),
        "up_bytes": sum(r["mb_sent"] * 1e6 / e for r, e in zip(reports, exchanges, strict=True))
        / len(reports),
        "down_bytes": sum(
            r["mb_received"] * 1e6 / e for r, e in zip(reports, exchanges, strict=True)
        )
        / len(reports),
    }


def measure(args: argparse.Namespace) -> dict:
    """Everything :func:`report` needs, from the emulated hosts."""
    from emulated_hosts import goodput

    measured: dict = {
        "rows": args.rows,
        "goodput": {},
        "runs": [],
        "apply_seconds": measure_apply_seconds(),
    }
    print(
        "server apply per push (s): "
        + ", ".join(f"{k} {v:.4f}" for k, v in measured["apply_seconds"].items())
    )
    goodputs: dict[str, list[float]] = {rate: [] for rate in args.rates}
    with emulated_cluster(workers=2) as (network, cluster):
        driver_host, worker_host = network.hosts[0], network.hosts[1]
        # every rate once per repeat: the machine's drift spreads over all
        for repeat in range(args.repeat):
            for rate in args.rates:
                network.shape(None if rate == "none" else rate)
                goodputs[rate].append(goodput(driver_host, worker_host))
                print(
                    f"{rate} (repeat {repeat + 1}): goodput {goodputs[rate][-1] / 1e6:.0f} MB/s",
                    flush=True,
                )
                for line in run_driver(
                    driver_host,
                    __file__,
                    cluster.master_url,
                    driver_host.address,
                    args.data or "",
                    str(args.rows),
                    ",".join(args.configs),
                ):
                    line.update(rate=rate, goodput=goodputs[rate][-1], repeat=repeat)
                    print(
                        f"  {line['config']} x{line['workers']}: "
                        f"{line['samples_per_second']:,.0f} samples/s, exchange "
                        f"{line['exchange_seconds']:.3f} s",
                        flush=True,
                    )
                    measured["runs"].append(line)
    measured["goodput"] = {rate: statistics.median(values) for rate, values in goodputs.items()}
    return measured


def medians(runs: list[dict]) -> list[dict]:
    """One run per (engine, workers, link): the median of each figure over the repeats."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["config"], run["workers"], run["rate"]), []).append(run)
    return [
        {
            **group[0],
            "repeats": len(group),
            **{
                k: statistics.median(r[k] for r in group)
                for k, v in group[0].items()
                if isinstance(v, float) and k != "goodput"
            },
        }
        for group in groups.values()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default=None, help="MNIST folder (default: the standard locations)"
    )
    parser.add_argument("--rows", type=int, default=8000, help="training rows per run")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of every point, interleaved; medians are modelled",
    )
    parser.add_argument(
        "--rates", nargs="+", default=RATES, help="link rates, 'none' first (the calibration)"
    )
    parser.add_argument("--out", help="write the measurements to this JSON file")
    parser.add_argument(
        "--from",
        dest="source",
        help="model the measurements in this JSON file instead of measuring",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=list(CONFIGS),
        choices=list(CONFIGS),
        help="engines to measure",
    )
    parser.add_argument(
        "--drive",
        nargs=5,
        metavar=("MASTER", "ADDRESS", "DATA", "ROWS", "CONFIGS"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    if args.drive:
        master, address, data, rows, configs = args.drive
        drive(master, address, data or None, int(rows), configs.split(","), [1, 2])
        return
    if args.source:
        measured = json.loads(Path(args.source).read_text())
    else:
        if args.rates[0] != "none":
            parser.error("--rates must start with 'none': the unshaped runs calibrate the model")
        measured = measure(args)
        if args.out:
            Path(args.out).write_text(json.dumps(measured, indent=1))
    report(measured)


if __name__ == "__main__":
    main()
