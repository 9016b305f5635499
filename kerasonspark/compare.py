"""Compare training strategies side by side: the same model, data and cores, one engine at a time.

Every engine trains a fresh copy of the model on the same cached DataFrame in the same Spark
session, then the test set is evaluated on the executors. Engines run interleaved (``single,
sync, async, single, sync, async, ...``) so a slow minute of the machine does not land on one
engine, and with ``repeat > 1`` each figure is the median of its runs::

    rows = compare_strategies(mnist_cnn, spark, train_df, test_df, ["single", "sync", "async:downpour"])
    table = format_table(rows)   # Markdown, medians per strategy

A strategy is a backend name, optionally with a variant after a colon (``async:adag``,
``elephas:hogwild``). Each run also keeps its accuracy curve: the model is snapshotted at every
epoch's end (a Keras callback, so every engine does it the same way) and the snapshots are scored
on the test set after ``fit``, outside its clock; the curve starts at the initial model's accuracy
at 0 s. :func:`plot_comparison` draws the curves and the speeds.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .engine import available_backends, resolve_backend
from .errors import ConfigurationError
from .trainer import SparkTrainer

if TYPE_CHECKING:
    import keras
    from pyspark.sql import DataFrame, SparkSession

# samples_per_s counts the training stage's seconds; samples_per_wall_s the whole `fit` (data preparation,
# start-up and Elephas's per-epoch set-up included): the fair figure across engines that prepare differently.
FIGURES = ("samples_per_s", "samples_per_wall_s", "train_s", "wall_s", "test_accuracy", "exchanges",
           "overlapping_writes", "max_staleness")


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
    curves: list[list[dict[str, float]]] = field(default_factory=list)  # per run: seconds, epoch, test_accuracy

    def median(self, figure: str) -> float:
        """The median of ``figure`` over the runs."""
        return statistics.median(run[figure] for run in self.runs)

    def as_dict(self) -> dict[str, Any]:
        """Medians, run count and ratio, then every run's figures and curve, as JSON-ready figures."""
        return {"strategy": self.strategy, "runs": len(self.runs), "vs_single": self.vs_single,
                **{figure: self.median(figure) for figure in FIGURES},
                "every_run": self.runs, "curves": self.curves}

    def median_run(self) -> int:
        """The index of the run whose samples/s is the median (the lower one of an even count)."""
        order = sorted(range(len(self.runs)), key=lambda i: self.runs[i]["samples_per_wall_s"])
        return order[(len(order) - 1) // 2]


def parse_strategy(strategy: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[str, dict[str, Any]]:
    """``"async:downpour"`` -> ``("async", {"rule": "downpour", ...})``, merged with per-strategy options.

    The variant after the colon sets the engine's :attr:`~kerasonspark.engine.Engine.strategy_option`
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
        option = getattr(engine, "strategy_option", None)
        if engine is not None and option is None:
            raise ConfigurationError(f"Strategy {strategy!r}: backend {backend!r} has no variants; write {backend!r}.")
        chosen[option or "rule"] = variant
    return backend, chosen


def compare_strategies(make_model: Callable[[], keras.Model], spark: SparkSession, train_df: DataFrame,
                       test_df: DataFrame, strategies: Sequence[str], *, num_workers: int = 2, batch_size: int = 32,
                       epochs: int = 1, repeat: int = 1, seed: int = 0,
                       options: Mapping[str, Mapping[str, Any]] | None = None,
                       on_run: Callable[[str, dict[str, float]], None] | None = None) -> list[StrategyRow]:
    """Train and evaluate each strategy ``repeat`` times on the same data and cores.

    Args:
        make_model: returns a fresh compiled model (the same initial weights each call, for a
            fair comparison).
        strategies: backend names, optionally ``backend:rule``.
        options: backend options by strategy or backend name, e.g. ``{"sync": {"sync_every": 32}}``.
        on_run: called after each run with the strategy and its figures (to print progress).

    Returns:
        One :class:`StrategyRow` per strategy, in the order given.

    Raises:
        ConfigurationError: an unknown backend or option (checked for every strategy before any
            training starts).
    """
    resolved = {strategy: parse_strategy(strategy, options) for strategy in strategies}
    for backend, backend_options in resolved.values():  # every engine and option first: a typo fails in seconds
        resolve_backend(backend, backend_options or None)
    rows = {strategy: StrategyRow(strategy) for strategy in strategies}
    initial = SparkTrainer(make_model(), spark=spark, verbose=0).evaluate(test_df)["accuracy"]
    for _ in range(repeat):
        for strategy, (backend, backend_options) in resolved.items():
            trainer = SparkTrainer(make_model(), backend=backend, num_workers=num_workers, batch_size=batch_size,
                                   epochs=epochs, backend_options=backend_options or None, spark=spark, seed=seed,
                                   verbose=0)
            snapshots: list[tuple[float, int, list]] = []
            started = time.perf_counter()
            stats = trainer.fit(train_df, callbacks=[_epoch_snapshots(started, snapshots)]).stats
            server = stats.get("parameter_server", {})  # common to every engine that serves weights
            run = {
                "samples_per_s": stats["samples_per_second"], "samples_per_wall_s": stats["samples"] / stats["wall_seconds"],
                "train_s": stats["train_seconds"],
                "wall_s": stats["wall_seconds"], "test_accuracy": trainer.evaluate(test_df)["accuracy"],
                "exchanges": stats["exchanges"],
                "overlapping_writes": server.get("overlapping_writes", 0),
                "max_staleness": server.get("staleness", {}).get("max", 0),
            }
            rows[strategy].runs.append(run)
            rows[strategy].curves.append([{"seconds": 0.0, "epoch": 0, "test_accuracy": initial},
                                          *_score_snapshots(trainer, snapshots, test_df, run["test_accuracy"])])
            if on_run is not None:
                on_run(strategy, run)
    single = rows.get("single")
    for row in rows.values():
        if single is not None:
            row.vs_single = row.median("samples_per_s") / single.median("samples_per_s")
    return list(rows.values())


def _epoch_snapshots(started: float, snapshots: list[tuple[float, int, list]]) -> Any:
    """A callback that keeps the model's weights at every epoch's end, with the seconds since ``started``."""
    import keras

    class EpochSnapshots(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            snapshots.append((time.perf_counter() - started, epoch + 1, self.model.get_weights()))

    return EpochSnapshots()


def _score_snapshots(trainer: SparkTrainer, snapshots: list[tuple[float, int, list]], test_df: DataFrame,
                     final_accuracy: float) -> list[dict[str, float]]:
    """Each snapshot's test accuracy (the final model's is known), the trained weights left in place."""
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
    figure, (curves, speeds) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [3, 2]})
    for row in rows:
        points = row.curves[row.median_run()]
        curves.plot([p["seconds"] for p in points], [p["test_accuracy"] for p in points], marker="o", label=row.strategy)
    curves.set_xlabel("wall-clock seconds since fit started")
    curves.set_ylabel("test accuracy (the model at each epoch's end)")
    curves.set_title("Accuracy against time")
    finals = [p["test_accuracy"] for row in rows for p in row.curves[row.median_run()][1:]]
    if finals:
        curves.set_ylim(max(min(finals) - 0.02, 0.0), min(max(finals) + 0.005, 1.0))
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8, loc="lower right")
    names = [row.strategy for row in rows]
    values = [row.median("samples_per_wall_s") for row in rows]
    bars = speeds.barh(names, values, color=["tab:gray" if n == "single" else "tab:blue" for n in names])
    speeds.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8, padding=3)
    single = next((row for row in rows if row.strategy == "single"), None)
    if single is not None:
        speeds.axvline(single.median("samples_per_wall_s"), color="tab:red", linestyle="--", label="single (reference)")
        speeds.legend(fontsize=8, loc="lower right")
    speeds.invert_yaxis()
    speeds.set_xlabel("samples/s (samples / wall seconds of fit; median of runs)")
    speeds.set_title("Speed")
    runs = max((len(row.runs) for row in rows), default=0)
    figure.suptitle(f"kerasonspark compare: {os.cpu_count()} CPU cores, {runs} run(s) per strategy"
                    + (f", {subtitle}" if subtitle else ""))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def format_table(rows: Sequence[StrategyRow]) -> str:
    """The rows as a Markdown table (medians), ready for a README."""
    lines = ["| strategy | runs | samples/s (training) | vs single | samples/s (whole fit) | train s | wall s | "
             "test accuracy | exchanges |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = f"{row.vs_single:.2f}x" if row.vs_single is not None else "-"
        exchanges = f"{row.median('exchanges'):.0f}" if row.median("exchanges") else "-"
        lines.append(f"| `{row.strategy}` | {len(row.runs)} | {row.median('samples_per_s'):,.0f} | {ratio} | "
                     f"{row.median('samples_per_wall_s'):,.0f} | {row.median('train_s'):.1f} | {row.median('wall_s'):.1f} | "
                     f"{row.median('test_accuracy'):.4f} | {exchanges} |")
    return "\n".join(lines)
