"""kerasonspark: train Keras 3 models on Apache Spark.

    from kerasonspark import SparkTrainer
    from kerasonspark.models import mnist_cnn

    result = SparkTrainer(mnist_cnn(), backend="sync", num_workers=2).fit(train_df)
"""

from .cluster import StandaloneCluster
from .compare import compare_strategies
from .engine import Engine, TrainingConfig, TrainingJob, TrainingResult, available_backends
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
from .trainer import SparkTrainer
from .worker import Exchange, ServerExchange

__version__ = "0.1.0"

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
    "available_backends",
    "compare_strategies",
]
