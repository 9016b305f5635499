"""Compare training strategies side by side: the same model, data and cores, one engine at a time.

Every engine trains a fresh copy of the model on the same cached DataFrame in the same Spark
session, then the test set is evaluated on the executors. Engines run interleaved (``single,
sync, async, single, sync, async, ...``) so a slow minute of the machine does not land on one
engine, and with ``repeat > 1`` each figure is the median of its runs::

    rows = compare_strategies(mnist_cnn, spark, train_df, test_df, ["single", "sync", "async:downpour"])
    table = format_table(rows)   # Markdown, medians per strategy

A strategy is a backend name, optionally with an update rule after a colon (``async:adag``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .engine import resolve_backend
from .trainer import SparkTrainer

if TYPE_CHECKING:
    import keras
    from pyspark.sql import DataFrame, SparkSession

FIGURES = ("samples_per_s", "train_s", "wall_s", "test_accuracy", "exchanges", "overlapping_writes", "max_staleness")


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

    def median(self, figure: str) -> float:
        """The median of ``figure`` over the runs."""
        return statistics.median(run[figure] for run in self.runs)

    def as_dict(self) -> dict[str, Any]:
        """Medians, run count and ratio, as JSON-ready figures."""
        return {"strategy": self.strategy, "runs": len(self.runs), "vs_single": self.vs_single,
                **{figure: self.median(figure) for figure in FIGURES}}


def parse_strategy(strategy: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[str, dict[str, Any]]:
    """``"async:downpour"`` -> ``("async", {"rule": "downpour", ...})``, merged with per-strategy options.

    ``options`` may be keyed by the whole strategy or by the backend name; the strategy's key wins.
    """
    backend, _, rule = strategy.partition(":")
    options = options or {}
    chosen = dict(options.get(strategy, options.get(backend, {})))
    if rule:
        chosen["rule"] = rule
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
    for _ in range(repeat):
        for strategy, (backend, backend_options) in resolved.items():
            trainer = SparkTrainer(make_model(), backend=backend, num_workers=num_workers, batch_size=batch_size,
                                   epochs=epochs, backend_options=backend_options or None, spark=spark, seed=seed,
                                   verbose=0)
            stats = trainer.fit(train_df).stats
            server = stats.get("parameter_server", {})  # common to every engine that serves weights
            run = {
                "samples_per_s": stats["samples_per_second"], "train_s": stats["train_seconds"],
                "wall_s": stats["wall_seconds"], "test_accuracy": trainer.evaluate(test_df)["accuracy"],
                "exchanges": stats["exchanges"],
                "overlapping_writes": server.get("overlapping_writes", 0),
                "max_staleness": server.get("staleness", {}).get("max", 0),
            }
            rows[strategy].runs.append(run)
            if on_run is not None:
                on_run(strategy, run)
    single = rows.get("single")
    for row in rows.values():
        if single is not None:
            row.vs_single = row.median("samples_per_s") / single.median("samples_per_s")
    return list(rows.values())


def format_table(rows: Sequence[StrategyRow]) -> str:
    """The rows as a Markdown table (medians), ready for a README."""
    lines = ["| strategy | runs | samples/s | vs single | train s | wall s | test accuracy | exchanges |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = f"{row.vs_single:.2f}x" if row.vs_single is not None else "-"
        exchanges = f"{row.median('exchanges'):.0f}" if row.median("exchanges") else "-"
        lines.append(f"| `{row.strategy}` | {len(row.runs)} | {row.median('samples_per_s'):,.0f} | {ratio} | "
                     f"{row.median('train_s'):.1f} | {row.median('wall_s'):.1f} | {row.median('test_accuracy'):.4f} | "
                     f"{exchanges} |")
    return "\n".join(lines)
