"""MLflow tracking (driver side): one run per ``fit``, whatever the engine.

``mlflow.keras.autolog()`` patches ``keras.Model.fit``, which only the ``single`` engine calls;
the others train in Spark tasks, so the driver logs the run itself: the parameters before
training, each epoch's merged metrics as the epoch ends (at the global step the driver's model
counts, see :mod:`kerasonspark._steering`), the run's figures and its whole ``stats`` after, and
the trained model with a signature that ``mlflow.pyfunc.spark_udf`` can serve. An active run is
logged into (as autologging does); otherwise ``fit`` starts one and ends it, ``FAILED`` when
training fails.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from ._config import MlflowConfig
from ._errors import ConfigurationError
from ._serialization import global_step

if TYPE_CHECKING:
    import keras

    from .engine import TrainingResult

logger = logging.getLogger(__name__)

INSTALL = 'pip install "kerasonspark[mlflow]"'
# The run's figures logged as metrics (every figure is in the stats.json artifact too).
FIGURES = ("samples_per_second", "train_seconds", "wall_seconds", "exchanges", "restarts")


def tracking_enabled(config: MlflowConfig) -> bool:
    """Whether ``fit`` logs to MLflow under ``config`` (see :class:`MlflowConfig`).

    MLflow is imported only where the process already uses it or a tracking URI is set, so a
    machine that has it installed but does not use it pays nothing.

    Raises:
        ConfigurationError: ``enabled=True`` and MLflow is not installed.
    """
    if config.enabled is False:
        return False
    if config.enabled is None and "mlflow" not in sys.modules:
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            return False
    try:
        import mlflow
    except ImportError as exc:
        if config.enabled:
            raise ConfigurationError(
                f"MlflowConfig(enabled=True) needs MLflow: {INSTALL}."
            ) from exc
        return False
    if config.enabled:
        return True
    return (
        bool(os.environ.get("MLFLOW_TRACKING_URI")) or _uri_set() or mlflow.active_run() is not None
    )


def _uri_set() -> bool:
    try:
        from mlflow.tracking._tracking_service.utils import is_tracking_uri_set
    except ImportError:  # a later MLflow moved it: the environment variable still counts
        return False
    return bool(is_tracking_uri_set())


@contextmanager
def tracked_run(config: MlflowConfig, default_name: str, nested: bool = False) -> Iterator[str]:
    """The active MLflow run, or one started for the block (``nested`` under the active one) and
    ended after it, ``FAILED`` if the block raised. Yields its run id."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and not nested:
        yield active.info.run_id
        return
    with mlflow.start_run(run_name=config.run_name or default_name, nested=nested) as run:
        yield run.info.run_id


class FitLogger:
    """What one ``fit`` logs into the MLflow run ``run_id``."""

    def __init__(self, config: MlflowConfig, run_id: str) -> None:
        import mlflow

        self.config, self.run_id = config, run_id
        self.client = mlflow.MlflowClient()

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log ``params`` (values as text, as MLflow stores them)."""
        from mlflow.entities import Param

        self.client.log_batch(
            self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()]
        )

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the finite scalar ``metrics`` at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [
            Metric(k, float(v), now, int(step))
            for k, v in metrics.items()
            if np.ndim(v) == 0 and np.isfinite(float(v))
        ]
        if entries:
            self.client.log_batch(self.run_id, metrics=entries)

    def callback(self) -> keras.callbacks.Callback:
        """A Keras callback that logs each epoch's logs at the model's global step."""
        import keras

        log = self

        class EpochMetrics(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                log.log_metrics(logs or {}, global_step(self.model))

        return EpochMetrics()

    def finish(self, result: TrainingResult) -> None:
        """Log the run's figures, its ``stats`` (``stats.json``) and, unless turned off, the
        model with its signature (custom layers load where they are registered with
        ``keras.saving.register_keras_serializable``, as for any ``.keras`` file)."""
        import mlflow

        stats = result.stats
        figures = {k: stats[k] for k in FIGURES if isinstance(stats.get(k), (int, float))}
        staleness = stats.get("parameter_server", {}).get("staleness", {})
        if isinstance(staleness.get("median"), (int, float)):
            figures["staleness_median"] = staleness["median"]
        self.log_metrics(figures, global_step(result.model))
        self.client.log_dict(self.run_id, _json_ready(stats), "kerasonspark/stats.json")
        if not self.config.log_model:
            return
        import keras
        import tensorflow as tf

        # log_model logs into the active run of this thread: make it this run's
        with _active(self.run_id):
            mlflow.keras.log_model(
                result.model,
                name="model",
                signature=model_signature(result.model),
                registered_model_name=self.config.registered_model_name,
                step=global_step(result.model),
                # what the model needs is known: MLflow's inference of it imports the model
                # again in a subprocess (seconds)
                pip_requirements=[f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}"],
            )


@contextmanager
def _active(run_id: str) -> Iterator[None]:
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        yield


def model_signature(model: keras.Model) -> Any:
    """The model's MLflow signature: a tensor spec per input and output, batch dimension -1
    (named where there are several)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def schema(tensors: list[Any]) -> Schema:
        specs: list[Any] = []
        for tensor in tensors:
            shape = (-1, *(-1 if d is None else int(d) for d in tensor.shape[1:]))
            name = getattr(tensor, "name", None) if len(tensors) > 1 else None
            specs.append(TensorSpec(np.dtype(str(tensor.dtype)), shape, name))
        return Schema(specs)

    return ModelSignature(schema(list(model.inputs)), schema(list(model.outputs)))


def fit_params(
    engine: Any, config: Any, model: keras.Model, samples: int, partitions: list[int]
) -> dict[str, Any]:
    """The parameters a ``fit`` logs: the engine and its options, the ``fit`` settings, the
    optimizer and its rate, and the data's size."""
    from ._executor import learning_rate_of

    options = engine.options
    params: dict[str, Any] = {
        "backend": engine.name,
        "num_workers": config.num_workers,
        "batch_size": config.batch_size,
        "epochs": config.epochs,
        "initial_epoch": config.initial_epoch,
        "seed": config.seed,
        "optimizer": type(model.optimizer).__name__,
        "learning_rate": learning_rate_of(model) or "schedule",
        "samples": samples,
        "partition_rows": partitions,
    }
    if dataclasses.is_dataclass(options):
        params.update(
            {f"backend.{f.name}": getattr(options, f.name) for f in dataclasses.fields(options)}
        )
    return params


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
