"""Compare training strategies side by side: the same model, data and cores, one engine at a time.

Every engine trains a fresh copy of the model on the same cached DataFrame in the same Spark
session, then the test set is evaluated on the executors. Engines run interleaved (``single,
sync, async, single, sync, async, ...``) so a slow minute of the machine does not land on one
engine, and with ``repeat > 1`` each figure is the median of its runs::

    rows = compare_strategies(mnist_cnn, spark, train_df, test_df, ["single", "sync",
    "async:downpour"])
    table = format_table(rows)   # Markdown, medians per strategy

A strategy is a backend name, optionally with a variant after a colon (``async:adag``,
``elephas:hogwild``). Each run also keeps its accuracy curve: the model is snapshotted at every
epoch's end (a Keras callback, so every engine does it the same way) and the snapshots are scored
on the test set after ``fit``, outside its clock; the curve starts at the initial model's accuracy
at 0 s. :func:`plot_comparison` draws the curves and the speeds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._config import MlflowConfig
from ._errors import ConfigurationError
from ._serialization import global_step
from ._tracking import FitLogger, tracked_run, tracking_enabled
from ._trainer import SparkTrainer
from .engine import available_backends, resolve_backend

if TYPE_CHECKING:
    import keras
    from pyspark.sql import DataFrame, SparkSession

# samples_per_s counts the training stage's seconds; samples_per_wall_s the whole `fit` (data
# preparation, start-up and Elephas's per-epoch set-up included): the fair figure across engines
# that prepare differently.
FIGURES = (
    "samples_per_s",
    "samples_per_wall_s",
    "train_s",
    "wall_s",
    "test_accuracy",
    "exchanges",
    "overlapping_writes",
    "max_staleness",
)


@dataclass
class StrategyRow:
    """The figures of one strategy: medians over its runs, and every run.

    Attributes:
        strategy: the strategy as given (``"async:downpour"``).
        runs: one dict of :data:`FIGURES` per run.
        vs_single: samples/s relative to ``single`` in the same comparison (``None`` without it).
    """

    strategy: str
    runs: list[dict[str, float]] = field(default_factory=list)
    vs_single: float | None = None
    # per run: seconds, epoch, test_accuracy
    curves: list[list[dict[str, float]]] = field(default_factory=list)
    workers: int | None = None  # None for an engine that trains without Spark workers (`single`)
    label: str = ""  # the strategy, with its worker count when the comparison has several

    def __post_init__(self) -> None:
        self.label = self.label or self.strategy

    def median(self, figure: str) -> float:
        """The median of ``figure`` over the runs."""
        return statistics.median(run[figure] for run in self.runs)

    def seconds_to(self, target: float) -> float | None:
        """The median over the runs of the seconds until a curve point reached ``target`` test
        accuracy (a run that never did counts as endless); ``None`` when most runs never did."""
        reached = [
            next((p["seconds"] for p in curve if p["test_accuracy"] >= target), math.inf)
            for curve in self.curves
        ]
        median = statistics.median(reached) if reached else math.inf
        return None if math.isinf(median) else median

    def accuracy_by_epoch(self) -> list[float]:
        """The median test accuracy at the end of each epoch."""
        ends = [
            [p["test_accuracy"] for p in curve if p["epoch"] > 0 and float(p["epoch"]).is_integer()]
            for curve in self.curves
        ]
        return [
            statistics.median(run[e] for run in ends if e < len(run))
            for e in range(min(map(len, ends), default=0))
        ]

    def as_dict(self, target: float | None = None) -> dict[str, Any]:
        """Medians, run count and ratio, then every run's figures and curve, as JSON-ready
        figures."""
        return {
            "strategy": self.strategy,
            "workers": self.workers,
            "runs": len(self.runs),
            "vs_single": self.vs_single,
            **{figure: self.median(figure) for figure in FIGURES},
            "accuracy_by_epoch": self.accuracy_by_epoch(),
            **(
                {"target": target, "seconds_to_target": self.seconds_to(target)}
                if target is not None
                else {}
            ),
            "every_run": self.runs,
            "curves": self.curves,
        }

    def median_run(self) -> int:
        """The index of the run whose samples/s is the median (the lower one of an even count)."""
        order = sorted(range(len(self.runs)), key=lambda i: self.runs[i]["samples_per_wall_s"])
        return order[(len(order) - 1) // 2]


def _variant_option(options_class: type) -> str | None:
    """The options field a strategy's variant sets (``metadata={"variant": True}``), or ``None``."""
    return next(
        (f.name for f in dataclasses.fields(options_class) if f.metadata.get("variant")), None
    )


def parse_strategy(
    strategy: str, options: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[str, dict[str, Any]]:
    """``"async:downpour"`` -> ``("async", {"rule": "downpour", ...})``, merged with per-strategy
    options.

    The variant after the colon sets the engine's option marked ``metadata={"variant": True}``
    (``rule`` for ``async`` and ``hogwild``, ``mode`` for ``elephas``). ``options`` may be keyed by
    the whole strategy or by the backend name; the strategy's key wins.

    Raises:
        ConfigurationError: a variant for an engine that has none.
    """
    backend, _, variant = strategy.partition(":")
    options = options or {}
    chosen = dict(options.get(strategy, options.get(backend, {})))
    if variant:
        engine = available_backends().get(backend)
        option = _variant_option(engine.options_class) if engine is not None else None
        if engine is not None and option is None:
            raise ConfigurationError(
                f"Strategy {strategy!r}: backend {backend!r} has no variants; write {backend!r}."
            )
        chosen[option or "rule"] = variant
    return backend, chosen


def compare_strategies(
    make_model: Callable[[], keras.Model],
    spark: SparkSession,
    train_df: DataFrame,
    test_df: DataFrame,
    strategies: Sequence[str],
    *,
    num_workers: int | Sequence[int] = 2,
    batch_size: int = 32,
    epochs: int = 1,
    repeat: int = 1,
    seed: int = 0,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    points_per_epoch: int = 4,
    on_run: Callable[[str, dict[str, float]], None] | None = None,
    tracking: MlflowConfig | None = None,
) -> list[StrategyRow]:
    """Train and evaluate each strategy ``repeat`` times on the same data and cores.

    Args:
        make_model: returns a fresh compiled model (the same initial weights each call, for a
            fair comparison).
        strategies: backend names, optionally ``backend:rule``.
        num_workers: a worker count, or several: each strategy runs at each (``single``, which
            trains without Spark workers, once).
        seed: the first run's shuffling seed; run ``i`` of each strategy shuffles with ``seed + i``,
            so the runs of a deterministic engine (``sync``) differ as much as the others' do and
            a median means something. The initial weights are ``make_model``'s in every run.
        options: backend options by strategy or backend name, e.g. ``{"sync": {"sync_every": 32}}``.
        points_per_epoch: curve points per epoch: the model is also snapshotted at each fraction
            of an epoch (by batch hooks: per batch for ``single``, per round of progress reports,
            about a second, for the server engines; engines that refuse batch hooks give epoch
            ends only).
        on_run: called after each run with the row's label and its figures (to print progress).
        tracking: MLflow logging (:class:`~kerasonspark.MlflowConfig`): one parent run with the
            comparison's settings and each row's medians, and a nested run per training run
            (what ``fit`` logs, plus its test accuracy).

    Returns:
        One :class:`StrategyRow` per strategy and worker count, in the order given.

    Raises:
        ConfigurationError: an unknown backend or option (checked for every strategy before any
            training starts).
    """
    resolved = {strategy: parse_strategy(strategy, options) for strategy in strategies}
    # a typo fails in seconds
    engines = {
        strategy: resolve_backend(
            backend, backend_options or None
        )  # every engine and option first:
        for strategy, (backend, backend_options) in resolved.items()
    }
    counts = [num_workers] if isinstance(num_workers, int) else list(num_workers)
    rows: dict[tuple[str, int | None], StrategyRow] = {}
    for workers in counts:
        for strategy in strategies:
            key = (strategy, workers if engines[strategy].trains_on != "driver" else None)
            if key not in rows:
                label = strategy if len(counts) == 1 or key[1] is None else f"{strategy} x{workers}"
                rows[key] = StrategyRow(strategy, workers=key[1], label=label)
    tracking = tracking or MlflowConfig()
    tracked = tracking_enabled(tracking)
    with ExitStack() as stack:
        parent = (
            FitLogger(tracking, stack.enter_context(tracked_run(tracking, "kerasonspark-compare")))
            if tracked
            else None
        )
        if parent is not None:
            parent.log_params(
                {
                    "strategies": list(strategies),
                    "num_workers": counts,
                    "batch_size": batch_size,
                    "epochs": epochs,
                    "repeat": repeat,
                    "seed": seed,
                }
            )
        initial = SparkTrainer(make_model(), spark=spark, verbose=0).evaluate(test_df)["accuracy"]
        steps_per_epoch = max(math.ceil(train_df.count() / batch_size), 1)
        for run_index in range(repeat):
            for (strategy, row_workers), row in rows.items():
                backend, backend_options = resolved[strategy]
                trainer = SparkTrainer(
                    make_model(),
                    backend=backend,
                    num_workers=row_workers or counts[0],
                    batch_size=batch_size,
                    epochs=epochs,
                    backend_options=backend_options or None,
                    spark=spark,
                    seed=seed + run_index,
                    verbose=0,
                    tracking=tracking,
                )
                snapshots: list[tuple[float, float, list]] = []
                started = time.perf_counter()
                snapshot = _snapshots(started, snapshots, steps_per_epoch, points_per_epoch)
                try:
                    engines[strategy].check_fit(trainer.model, [snapshot], False)
                except ConfigurationError:  # an engine that runs no batch hooks: one point an epoch
                    snapshot = _snapshots(started, snapshots, steps_per_epoch, 1)
                nested = (
                    tracked_run(tracking, f"{row.label} run {run_index + 1}", nested=True)
                    if tracked
                    else nullcontext(None)
                )
                with nested as run_id:
                    stats = trainer.fit(train_df, callbacks=[snapshot]).stats
                    test_accuracy = trainer.evaluate(test_df)["accuracy"]
                    if run_id is not None:
                        FitLogger(tracking, run_id).log_metrics(
                            {"test_accuracy": test_accuracy}, global_step(trainer.model)
                        )
                server = stats.get(
                    "parameter_server", {}
                )  # common to every engine that serves weights
                run = {
                    "samples_per_s": stats["samples_per_second"],
                    "samples_per_wall_s": stats["samples"] / stats["wall_seconds"],
                    "train_s": stats["train_seconds"],
                    "wall_s": stats["wall_seconds"],
                    "test_accuracy": test_accuracy,
                    "exchanges": stats["exchanges"],
                    "overlapping_writes": server.get("overlapping_writes", 0),
                    "max_staleness": server.get("staleness", {}).get("max", 0),
                }
                row.runs.append(run)
                row.curves.append(
                    [
                        {"seconds": 0.0, "epoch": 0, "test_accuracy": initial},
                        *_score_snapshots(trainer, snapshots, test_df, run["test_accuracy"]),
                    ]
                )
                if on_run is not None:
                    on_run(row.label, run)
        single = next((row for row in rows.values() if row.strategy == "single"), None)
        for row in rows.values():
            if single is not None:
                row.vs_single = row.median("samples_per_s") / single.median("samples_per_s")
            if parent is not None:
                parent.log_metrics(
                    {
                        f"{row.label}/{figure}": row.median(figure)
                        for figure in ("samples_per_s", "test_accuracy", "wall_s")
                    },
                    0,
                )
    return list(rows.values())


def _snapshots(
    started: float, snapshots: list[tuple[float, float, list]], steps_per_epoch: int, points: int
) -> Any:
    """A callback that keeps the model's weights ``points`` times an epoch (the last at its end),
    with the seconds since ``started`` and the epochs done (fractions between ends)."""
    import keras

    class EpochSnapshots(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.epoch, self.next_point = epoch, 1

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            snapshots.append((time.perf_counter() - started, epoch + 1, self.model.get_weights()))

    class Snapshots(EpochSnapshots):
        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            # `batch`: the steps done this epoch (per batch in model.fit; per report round, over all
            # workers, in a served run): snapshot when it passes the next fraction of the epoch.
            done = (batch + 1) / steps_per_epoch
            if self.next_point < points and done >= self.next_point / points:
                fraction = min(round(done, 3), 0.999)  # the epoch's end is on_epoch_end's point
                snapshots.append(
                    (time.perf_counter() - started, self.epoch + fraction, self.model.get_weights())
                )
                while self.next_point < points and done >= self.next_point / points:
                    self.next_point += 1

    return Snapshots() if points > 1 else EpochSnapshots()


def _score_snapshots(
    trainer: SparkTrainer,
    snapshots: list[tuple[float, float, list]],
    test_df: DataFrame,
    final_accuracy: float,
) -> list[dict[str, float]]:
    """Each snapshot's test accuracy (the final model's is known), the trained weights left in
    place."""
    import numpy as np

    final = trainer.model.get_weights()
    curve = []
    for seconds, epoch, weights in snapshots:
        if all(np.array_equal(a, b) for a, b in zip(weights, final, strict=True)):
            accuracy = final_accuracy
        else:
            trainer.model.set_weights(weights)
            accuracy = trainer.evaluate(test_df)["accuracy"]
        curve.append({"seconds": round(seconds, 3), "epoch": epoch, "test_accuracy": accuracy})
    trainer.model.set_weights(final)
    return curve


def plot_comparison(rows: Sequence[StrategyRow], path: str, subtitle: str = "") -> None:
    """Write a PNG: test accuracy against seconds since ``fit`` started (one line per strategy, its
    median-speed run), and samples/s per strategy as bars with ``single`` marked.

    Raises:
        ConfigurationError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigurationError("`--plot` draws with matplotlib: pip install matplotlib") from None
    figure, (curves, speeds) = plt.subplots(
        1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [3, 2]}
    )
    for row in rows:
        points = row.curves[row.median_run()]
        curves.plot(
            [p["seconds"] for p in points],
            [p["test_accuracy"] for p in points],
            marker="o",
            markersize=3,
            label=row.label,
        )
    curves.set_xlabel("wall-clock seconds since fit started")
    curves.set_ylabel("test accuracy (the model at each epoch's end)")
    curves.set_title("Accuracy against time")
    finals = [p["test_accuracy"] for row in rows for p in row.curves[row.median_run()][1:]]
    if finals:
        curves.set_ylim(max(min(finals) - 0.02, 0.0), min(max(finals) + 0.005, 1.0))
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8, loc="lower right")
    names = [row.label for row in rows]
    values = [row.median("samples_per_wall_s") for row in rows]
    bars = speeds.barh(
        names,
        values,
        color=["tab:gray" if row.strategy == "single" else "tab:blue" for row in rows],
    )
    speeds.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8, padding=3)
    single = next((row for row in rows if row.strategy == "single"), None)
    if single is not None:
        speeds.axvline(
            single.median("samples_per_wall_s"),
            color="tab:red",
            linestyle="--",
            label="single (reference)",
        )
        speeds.legend(fontsize=8, loc="lower right")
    speeds.invert_yaxis()
    speeds.set_xlabel("samples/s (samples / wall seconds of fit; median of runs)")
    speeds.set_title("Speed")
    runs = max((len(row.runs) for row in rows), default=0)
    figure.suptitle(
        f"kerasonspark compare: {os.cpu_count()} CPU cores, {runs} run(s) per strategy"
        + (f", {subtitle}" if subtitle else "")
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def format_table(rows: Sequence[StrategyRow], target: float | None = None) -> str:
    """The rows as a Markdown table (medians), ready for a README: with a worker column when the
    rows have several counts, the accuracy after each epoch when there are several, and the
    seconds to ``target`` test accuracy."""
    several_counts = len({row.workers for row in rows if row.workers is not None}) > 1
    epochs = max((len(row.accuracy_by_epoch()) for row in rows), default=0)
    head = [
        "strategy",
        *(["workers"] if several_counts else []),
        "runs",
        "samples/s (training)",
        "vs single",
        "samples/s (whole fit)",
        "train s",
        "wall s",
        "test accuracy",
        *(["accuracy by epoch"] if epochs > 1 else []),
        *([f"s to {target:g}"] if target is not None else []),
        "exchanges",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ratio = f"{row.vs_single:.2f}x" if row.vs_single is not None else "-"
        exchanges = f"{row.median('exchanges'):.0f}" if row.median("exchanges") else "-"
        whole_fit = f"{row.median('samples_per_wall_s'):,.0f}"
        # bimodal on small machines: its range, not only the median
        if row.strategy == "single" and len(row.runs) > 1:
            speeds = [run["samples_per_wall_s"] for run in row.runs]
            whole_fit += f" ({min(speeds):,.0f}-{max(speeds):,.0f})"
        cells = [
            f"`{row.strategy}`",
            *([str(row.workers or "-")] if several_counts else []),
            str(len(row.runs)),
            f"{row.median('samples_per_s'):,.0f}",
            ratio,
            whole_fit,
            f"{row.median('train_s'):.1f}",
            f"{row.median('wall_s'):.1f}",
            f"{row.median('test_accuracy'):.4f}",
        ]
        if epochs > 1:
            cells.append(" / ".join(f"{a:.4f}" for a in row.accuracy_by_epoch()))
        if target is not None:
            seconds = row.seconds_to(target)
            cells.append(f"{seconds:.1f}" if seconds is not None else "not reached")
        cells.append(exchanges)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
