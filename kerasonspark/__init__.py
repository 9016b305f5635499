"""kerasonspark: train Keras 3 models on Apache Spark.

    from kerasonspark import SparkTrainer
    from kerasonspark.models import mnist_cnn

    result = SparkTrainer(mnist_cnn(), backend="sync", num_workers=2).fit(train_df)

The names below load on first use: a Spark task that imports ``kerasonspark.executor`` runs this
file too, and must not pull in the trainer, the cluster launcher or Flask with it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import (
    BarrierTimeoutError,
    ConfigurationError,
    DataError,
    KerasOnSparkError,
    ParameterServerError,
    SparkEnvironmentError,
    WireFormatError,
    WorkerError,
)

if TYPE_CHECKING:
    from .cluster import StandaloneCluster
    from .compare import compare_strategies
    from .engine import (
        Engine,
        Exchange,
        ServerExchange,
        TrainingConfig,
        TrainingJob,
        TrainingResult,
        WorkerReport,
        available_backends,
    )
    from .trainer import SparkTrainer

__version__ = "0.1.0"

_LAZY = {"SparkTrainer": "trainer", "StandaloneCluster": "cluster", "compare_strategies": "compare",
         **{name: "engine" for name in ("Engine", "Exchange", "ServerExchange", "TrainingConfig", "TrainingJob",
                                        "TrainingResult", "WorkerReport", "available_backends")}}

__all__ = [
    "BarrierTimeoutError",
    "ConfigurationError",
    "DataError",
    "Engine",
    "Exchange",
    "KerasOnSparkError",
    "ParameterServerError",
    "ServerExchange",
    "SparkEnvironmentError",
    "SparkTrainer",
    "StandaloneCluster",
    "TrainingConfig",
    "TrainingJob",
    "TrainingResult",
    "WireFormatError",
    "WorkerError",
    "WorkerReport",
    "available_backends",
    "compare_strategies",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
