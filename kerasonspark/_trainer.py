"""SparkTrainer (driver side): train, evaluate and predict with a Keras model on Spark, with any
engine."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _classic as classic
from . import _data as data_module
from ._backup import BackupPlan, BackupStore, architecture, check_resumable, run_settings
from ._classic import share
from ._config import DataConfig, FailureConfig, MlflowConfig, ResourceConfig, TrainingConfig
from ._data import DataInfo
from ._driver import SparkRunner, ship_by_value, spark_errors, spark_job
from ._errors import ConfigurationError, DataError
from ._executor import evaluate_partition, predict_batches, warm_up
from ._serialization import ModelSpec, set_flat_weights, spec_version
from ._session import (
    check_slots,
    check_weights_privacy,
    master,
    server_host,
    server_placement,
    server_port,
    start_session,
)
from ._shipping import ensure_executors_ready
from ._stage_host import check_stage_serving
from ._stages import run_on_partitions
from ._tracking import FitLogger, fit_params, tracked_run, tracking_enabled
from .engine import Engine, TrainingJob, TrainingResult, resolve_backend

if TYPE_CHECKING:
    import keras
    from pyspark.sql import Column, DataFrame, SparkSession
    from pyspark.sql.types import DataType

logger = logging.getLogger(__name__)


class SparkTrainer:
    """Train a Keras model on Spark the way ``model.fit`` trains it locally.

    Args:
        model: a built, compiled ``keras.Model``. It is trained in place.
        backend: an engine name (``"sync"``, ``"single"``, or any installed engine; see
            :func:`kerasonspark.available_backends`) or a configured engine object.
        num_workers: Spark tasks that train side by side (each gets one data partition).
        batch_size: samples per local step.
        epochs: passes over the training data.
        backend_options: engine options, e.g. ``{"sync_every": 32}`` for ``"sync"``.
        master: Spark master URL for a session the trainer starts (default ``local[num_workers]``).
        spark: an existing ``SparkSession`` to use.
        seed: makes data shuffling repeatable.
        verbose: as in ``model.fit``: 0 silent, 1 a live progress bar per epoch (samples done,
            samples/s, running loss and metrics, rounds or pushes and staleness), 2 one line per
            epoch. Where output is not a terminal or a notebook, the bar prints plain lines.
        custom_objects: custom layers, losses or metrics the model uses, by name.
        checkpoint_dir: back the run up there at every epoch boundary and resume from the latest
            backup when ``fit`` runs again (shorthand for
            ``fit(callbacks=[keras.callbacks.BackupAndRestore(checkpoint_dir)])``).
        failure: restarts after a lost worker and the timeouts (:class:`FailureConfig`).
        data: where workers keep their partitions and how steps are shared
            (:class:`DataConfig`).
        resources: what each worker may use of its machine (:class:`ResourceConfig`).
        tracking: how ``fit`` logs to MLflow (:class:`MlflowConfig`; by default it does when
            MLflow is installed and a tracking URI is set).

    Example:
        >>> trainer = SparkTrainer(mnist_cnn(), backend="sync", num_workers=2, epochs=1)
        >>> result = trainer.fit(train_df, label="label", validation_data=test_df)
        >>> result.history["val_accuracy"]
    """

    def __init__(
        self,
        model: keras.Model,
        backend: str | Engine = "sync",
        *,
        num_workers: int = TrainingConfig.num_workers,
        batch_size: int = TrainingConfig.batch_size,
        epochs: int = TrainingConfig.epochs,
        seed: int | None = TrainingConfig.seed,
        verbose: int = TrainingConfig.verbose,
        backend_options: Mapping[str, Any] | None = None,
        master: str | None = None,
        spark: SparkSession | None = None,
        custom_objects: Mapping[str, Any] | None = None,
        checkpoint_dir: str | None = None,
        failure: FailureConfig | None = None,
        data: DataConfig | None = None,
        resources: ResourceConfig | None = None,
        tracking: MlflowConfig | None = None,
    ) -> None:
        import keras

        if not isinstance(model, keras.Model):
            raise TypeError(
                f"Expected `model` to be a keras.Model. Received: {type(model).__name__}."
            )
        if not getattr(model, "compiled", False):
            raise ConfigurationError(
                "The model is not compiled. Call `model.compile(optimizer=..., loss=...)` first."
            )
        self.model = model
        self.config = TrainingConfig(
            epochs=epochs,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            verbose=verbose,
            failure=FailureConfig() if failure is None else failure,
            data=DataConfig() if data is None else data,
            resources=ResourceConfig() if resources is None else resources,
        )
        self.engine = resolve_backend(backend, backend_options)
        if self.config.data.partition_storage == "stream" and self.engine.trains_on != "workers":
            raise ConfigurationError(
                f"Backend {self.engine.name!r} does not train through the shared worker loop, so "
                "it cannot stream partitions; use DataConfig(partition_storage='auto' or "
                "'memory'), or another backend (sync, async and hogwild stream)."
            )
        self.master = master
        self.spark = spark
        self.checkpoint_dir = checkpoint_dir
        self.custom_objects = dict(custom_objects or {})
        if tracking is not None and not isinstance(tracking, MlflowConfig):
            raise ConfigurationError(
                "Expected `tracking` to be a kerasonspark.MlflowConfig, e.g. "
                f"tracking=MlflowConfig(...). Received: {type(tracking).__name__}."
            )
        self.tracking = tracking or MlflowConfig()
        self._owned_session: SparkSession | None = None
        self.info = DataInfo.for_model(model, model.get_compile_config())

    # -- sessions -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _session(self, data: Any, keep: bool = False) -> Iterator[SparkSession]:
        from pyspark.sql import DataFrame, SparkSession

        given = self.spark
        if given is None and isinstance(data, DataFrame):
            given = data.sparkSession
        elif given is None and classic.is_rdd(data):
            given = classic.rdd_session(data)
        given = given or self._owned_session or SparkSession.getActiveSession()
        if given is not None:
            ensure_executors_ready(given)
            yield given
            return
        session = start_session(self.master or f"local[{self.config.num_workers}]")
        try:
            ensure_executors_ready(session)
            yield session
        finally:
            if keep:
                self._owned_session = session
            else:
                session.stop()

    def close(self) -> None:
        """Stop a Spark session this trainer started and kept (for ``predict`` on NumPy input)."""
        if self._owned_session is not None:
            self._owned_session.stop()
            self._owned_session = None

    def __enter__(self) -> SparkTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- fit ------------------------------------------------------------------------------
    def fit(
        self,
        x: Any,
        y: Any = None,
        *,
        features: str | list[str] = "features",
        label: str | list[str] = "label",
        validation_data: Any = None,
        callbacks: list[keras.callbacks.Callback] | None = None,
        initial_epoch: int = 0,
        validation_freq: int = 1,
        sample_weight: Any = None,
        class_weight: Mapping[int, float] | None = None,
    ) -> TrainingResult:
        """Train the model on ``x`` with the configured engine.

        Args:
            x: a Spark DataFrame (``spark.table(...)`` for a table), a Parquet file or folder's
                path, an RDD of ``(features, label)``, a NumPy (or array-like) feature array with
                its labels in ``y``, or a pair ``(x, y)``. A model with several inputs takes a list
                of feature arrays (or a dict by input name), as ``model.fit`` does.
            y: the labels, when ``x`` is a feature array (as in ``model.fit(x, y)``); a list (or
                a dict by output name) for a model with several outputs.
            features: the feature column (array or ML Vector) of a DataFrame; for a model with
                several inputs, a list of columns, one per input in the order of ``model.inputs``.
            label: the label column (class index, number, or one-hot array) of a DataFrame; for a
                model with several outputs, a list of columns, one per output in the order of
                ``model.output_names``.
            validation_data: the same kinds of input. At the end of each epoch every worker
                scores the epoch's center on its share of these rows, so ``val_*`` is the model
                ``fit`` returns.
            callbacks: ``keras.callbacks.Callback`` objects, run on the driver against a model
                holding the center weights (see :mod:`kerasonspark._steering` for which hooks
                fire when). ``model.stop_training`` stops every worker at the epoch boundary; a
                new learning rate reaches every worker before its next epoch.
            initial_epoch: the epoch to start from, as in Keras (to resume a run).
            validation_freq: score the center after every ``validation_freq``-th epoch.
            sample_weight: each training row's weight in the loss, as in ``model.fit``: a
                DataFrame's column name, or, with a feature array, one number per row. Weights
                must be finite and >= 0. Every engine but ``elephas`` takes them.
            class_weight: ``{class index: weight}`` for a classification loss, as in
                ``model.fit``: each row's loss is scaled by its class's weight (times its sample
                weight); classes left out weigh 1.

        Returns:
            A :class:`TrainingResult` with the trained model, per-epoch history and run figures.

        Raises:
            DataError: the data does not fit the model (checked before training starts).
            ConfigurationError: the cluster has fewer task slots than ``num_workers``, or the
                engine cannot run callbacks.
            WorkerError: a worker failed during training.
        """
        arguments = dict(
            features=features,
            label=label,
            validation_data=validation_data,
            callbacks=callbacks,
            initial_epoch=initial_epoch,
            validation_freq=validation_freq,
            sample_weight=sample_weight,
            class_weight=class_weight,
        )
        if not tracking_enabled(self.tracking):
            return self._fit(x, y, **arguments)
        with tracked_run(self.tracking, f"kerasonspark-{self.engine.name}") as run_id:
            log = FitLogger(self.tracking, run_id)
            result = self._fit(x, y, **arguments, log=log)
            log.finish(result)
        return result

    def _fit(
        self,
        x: Any,
        y: Any,
        *,
        features: str | list[str],
        label: str | list[str],
        validation_data: Any,
        callbacks: list[keras.callbacks.Callback] | None,
        initial_epoch: int,
        validation_freq: int,
        sample_weight: Any,
        class_weight: Mapping[int, float] | None,
        log: FitLogger | None = None,
    ) -> TrainingResult:
        started = time.perf_counter()
        callbacks = _check_callbacks(callbacks)
        callbacks, backup = self._backup_plan(callbacks)
        dense = (
            data_module.dense_class_weight(class_weight, self.info)
            if class_weight is not None
            else None
        )
        config = dataclasses.replace(
            self.config,
            initial_epoch=initial_epoch,
            validation_freq=validation_freq,
            class_weight=dense,
        )
        data = _features_and_labels(x, y, "fit", sample_weight)
        weight_column = sample_weight if isinstance(sample_weight, str) else None
        self.engine.check_fit(
            self.model, callbacks, sample_weight is not None or class_weight is not None
        )
        on_spark, served = self.engine.trains_on != "driver", self.engine.trains_on == "workers"
        with self._session(data) as spark:
            if self.engine.trains_on == "spark":  # before any work
                classic.require_rdds(spark, f"Backend {self.engine.name!r}")
            if backup is not None:
                config = self._resume(backup, config, spark)
            if on_spark:
                check_slots(
                    spark, self.config.num_workers, self.config.failure.registration_timeout
                )
            placement = server_placement(spark)
            if served:
                check_weights_privacy(spark.conf.getAll, server_host(spark))
                if placement == "stage":
                    check_stage_serving(callbacks, backup is not None)
            spec = self._spec()
            run_id = f"{spec.fingerprint}-{uuid.uuid4().hex[:8]}"
            spec_broadcast = share(spark, spec.to_bytes())
            prepared, runner, held_out = None, None, None
            try:
                validation = None
                if (
                    validation_data is not None
                    and on_spark
                    and not isinstance(validation_data, (tuple, list))
                ):
                    # Validation data that lives in Spark stays there: each worker scores its
                    # partition.
                    with spark_errors(), spark_job(spark, "kerasonspark prepare validation data"):
                        held_out = data_module.prepare(
                            spark,
                            validation_data,
                            features,
                            label,
                            self.info,
                            self.config.num_workers,
                            "validation",
                            require_rows=False,
                        )
                elif validation_data is not None:
                    validation = self._local_arrays(
                        spark, validation_data, features, label, "validation"
                    )
                warm = (
                    partial(
                        warm_up,
                        spec_broadcast,
                        spec.custom_objects,
                        run_id,
                        self.info,
                        self.config.resources,
                    )
                    if on_spark
                    else None
                )
                prepare_started = time.perf_counter()
                storage = self.config.data.partition_storage if served else "memory"
                with spark_errors(), spark_job(spark, "kerasonspark prepare"):
                    prepared = data_module.prepare(
                        spark,
                        data,
                        features,
                        label,
                        self.info,
                        self.config.num_workers,
                        "training",
                        warm,
                        weight_column,
                        partition_storage=storage,
                    )
                prepare_seconds = time.perf_counter() - prepare_started
                streamed = prepared.streams(storage)
                if log is not None:
                    log.log_params(
                        fit_params(
                            self.engine, config, self.model, sum(prepared.counts), prepared.counts
                        )
                    )
                    callbacks = [*callbacks, log.callback()]
                runner = SparkRunner(
                    spark, prepared.blocks, spec_broadcast, self.engine.name, backup, placement
                )
                job = TrainingJob(
                    spec=spec,
                    model=self.model,
                    info=self.info.with_given_labels(prepared.label_width, prepared.integer_labels),
                    config=config,
                    runner=runner,
                    run_id=run_id,
                    partition_sizes=prepared.counts,
                    validation=validation,
                    validation_blocks=held_out.blocks if held_out is not None else None,
                    server_host=server_host(spark),
                    server_port=server_port(spark),
                    callbacks=callbacks,
                    streamed=streamed,
                    trains_on=self.engine.trains_on,
                )
                result = self.engine.run(job)
            finally:
                if runner is not None:
                    runner.release()
                for data_set in (prepared, held_out):
                    if data_set is not None:
                        data_set.release()
                spec_broadcast.destroy()
        result.stats["wall_seconds"] = time.perf_counter() - started
        result.stats["prepare_seconds"] = prepare_seconds
        result.stats["partition_storage"] = {
            "path": "stream" if streamed else "memory",
            "chosen_by": self.config.data.partition_storage,
            "largest_partition_mb": max(prepared.partition_bytes, default=0) / 2**20,
            "worker_budget_mb": (prepared.memory_budget or 0) / 2**20,
        }
        return result

    def _backup_plan(
        self, callbacks: list[keras.callbacks.Callback]
    ) -> tuple[list[keras.callbacks.Callback], BackupPlan | None]:
        """Take ``BackupAndRestore`` out of the callbacks (the driver backs the run up itself,
        atomically, with what a distributed run needs) and make the plan."""
        import keras

        chosen = [cb for cb in callbacks if isinstance(cb, keras.callbacks.BackupAndRestore)]
        if len(chosen) > 1:
            raise ConfigurationError("Pass at most one keras.callbacks.BackupAndRestore.")
        if chosen and self.checkpoint_dir is not None:
            raise ConfigurationError(
                "Pass either `checkpoint_dir` or a BackupAndRestore callback, not both."
            )
        if not chosen and self.checkpoint_dir is None:
            return callbacks, None
        if self.engine.trains_on != "workers":
            if chosen:
                # an engine that trains on the driver hands the callback to model.fit
                return (
                    callbacks,
                    None,
                )
            raise ConfigurationError(
                f"Backend {self.engine.name!r} trains without the parameter server; pass "
                "keras.callbacks.BackupAndRestore to back it up instead of `checkpoint_dir`."
            )
        directory, save_freq, delete = self.checkpoint_dir, "epoch", True
        if chosen:
            directory, save_freq, delete = (
                chosen[0].backup_dir,
                chosen[0].save_freq,
                chosen[0].delete_checkpoint,
            )
        assert directory is not None
        settings = run_settings(
            architecture(self.model), self.engine.name, self._schema(), self.config.num_workers, ""
        )
        plan = BackupPlan(BackupStore(directory), save_freq, settings, delete_when_done=delete)
        return [cb for cb in callbacks if cb not in chosen], plan

    def _schema(self) -> dict[str, Any]:
        info = self.info
        return {
            "input_shape": list(info.input_shape),
            "label_mode": info.label_mode,
            "num_classes": info.num_classes,
            "target_shape": list(info.target_shape),
        }

    def _resume(
        self, plan: BackupPlan, config: TrainingConfig, spark: SparkSession
    ) -> TrainingConfig:
        """Start from the plan's latest backup, if there is one: its weights and its epoch."""
        plan.settings["master"] = master(spark)
        state = plan.store.latest()
        if state is None:
            return config
        check_resumable(state, plan.settings)
        if state.center.shape != (sum(int(np.prod(w.shape)) for w in self.model.weights),):
            raise ConfigurationError(
                f"The backup holds {state.center.size} weights; the model has a different size."
            )
        if state.settings.get("num_workers") != config.num_workers:
            # positions belong to the old workers: resume at the start of the epoch
            state.resume = {}
        set_flat_weights(self.model, state.center)
        plan.resumed = state
        logger.info(
            "Resuming from the backup in %s: epoch %d", plan.store.directory, state.epoch + 1
        )
        return dataclasses.replace(config, initial_epoch=state.epoch)

    def _spec(self) -> ModelSpec:
        """The model as plain data, its custom objects made to reach executors that lack their
        modules."""
        spec = ModelSpec.from_model(self.model, self.custom_objects)
        for obj in spec.custom_objects.values():
            ship_by_value(obj)
        return spec

    def _local_arrays(
        self, spark: SparkSession, data: Any, features: Any, label: Any, what: str
    ) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(data, (tuple, list)):  # NumPy: already here
            x, y, w = data_module.validate_arrays(tuple(data), self.info, what)
        else:
            with spark_errors(), spark_job(spark, f"kerasonspark collect {what} data"):
                x, y, w = data_module.collect_arrays(
                    data_module.to_blocks(spark, data, features, label, self.info, None, what),
                    self.info.input_shape,
                )
        if w is not None:
            raise DataError(
                f"The {what} data carries sample weights; {what} scores are unweighted here. Pass "
                "`(x, y)`."
            )
        data_module.check_label_shape(y.shape, self.info, f"the {what} data")
        data_module.raise_problems([data_module.block_problems(x, y, self.info)], what)
        return x, y

    # -- evaluate / predict -----------------------------------------------------------------

    def evaluate(
        self,
        x: Any,
        y: Any = None,
        *,
        features: str | list[str] = "features",
        label: str | list[str] = "label",
        batch_size: int = 256,
    ) -> dict[str, float]:
        """Loss and metrics of the current model on ``x`` (the inputs :meth:`fit` takes), computed
        on the executors.

        Metrics that are means over samples (loss, accuracy) are exact; each partition's result
        is weighted by its rows.

        Returns:
            ``{"loss": ..., "accuracy": ..., ...}`` like ``model.evaluate(return_dict=True)``.
        """
        from pyspark import StorageLevel

        data = _features_and_labels(x, y, "evaluate")
        spec = self._spec()
        with self._session(data) as spark:
            with spark_errors():
                blocks = data_module.to_blocks(
                    spark, data, features, label, self.info, None, "evaluation"
                )
            with spark_errors(), spark_job(spark, "kerasonspark evaluate"):
                data_module.materialize(blocks, StorageLevel.MEMORY_AND_DISK)
            spec_bytes = spec.to_bytes()
            spec_broadcast = share(spark, spec_bytes)
            body = partial(
                evaluate_partition,
                spec_broadcast=spec_broadcast,
                custom_objects=spec.custom_objects,
                info=self.info,
                resources=self.config.resources,
                batch_size=batch_size,
                version=spec_version(spec_bytes),
            )
            try:
                with spark_errors(), spark_job(spark, "kerasonspark evaluate"):
                    results = run_on_partitions(blocks, body, self.info.input_shape)
            finally:
                spec_broadcast.destroy()
                data_module.release_blocks(blocks)
        if not results:
            raise DataError("The evaluation data is empty.")
        total = sum(n for n, _ in results)
        return {k: sum(n * s[k] for n, s in results) / total for k in results[0][1]}

    def predict(
        self,
        data: Any,
        *,
        features: str | list[str] = "features",
        output_col: str = "prediction",
        batch_size: int = 256,
    ) -> DataFrame:
        """Predictions for ``data``, computed on the executors, as a DataFrame.

        A DataFrame keeps all its columns and gains ``output_col`` (array<float>); of a model with
        several outputs, one ``<output_col>_<output name>`` column each. NumPy features (a list
        of arrays for several inputs; or an RDD of feature vectors or ``(features, label)``
        pairs) become a DataFrame of ``features`` (several inputs side by side) and the
        predictions. A Spark session the trainer had to start for NumPy input lives until
        :meth:`close`.
        """
        from pyspark.sql import DataFrame
        from pyspark.sql import types as T

        spec = self._spec()
        with self._session(data, keep=True) as spark:
            # of NumPy input's DataFrame
            name = features if isinstance(features, str) else "features"
            if isinstance(data, DataFrame):
                df, column = (
                    data,
                    data_module.features_column(data, features, self.info, "prediction"),
                )
            elif classic.is_rdd(data):
                df = classic.rdd_feature_frame(data, name)
                column = data_module.features_column(df, features, self.info, "prediction")
            else:
                x = data[0] if isinstance(data, tuple) else data
                x = (
                    self.info.pack_features(x, "the prediction features")
                    if self.info.inputs
                    else data_module.as_features(x, self.info, "the prediction features")
                )
                df = data_module.numpy_to_dataframe(spark, x, features=name)
                # several inputs: packed already
                column = data_module.feature_column(df, name, "prediction")
            data_module.check_first_row(
                df.select(column.alias("f")), "f", str(features), self.info, "prediction"
            )
            columns = [f"{output_col}_{output}" for output, _ in self.info.outputs] or [output_col]
            return predict_dataframe(
                df,
                spec,
                self.info,
                column,
                {c: T.ArrayType(T.FloatType()) for c in columns},
                "array",
                batch_size,
                self.config.resources,
            )


def _check_callbacks(callbacks: Any) -> list[keras.callbacks.Callback]:
    """``fit``'s callbacks as a list of ``keras.callbacks.Callback`` (the engine's ``check_fit``
    says
    which it can run)."""
    import keras

    if callbacks is None:
        return []
    if isinstance(callbacks, keras.callbacks.Callback):
        callbacks = [callbacks]
    callbacks = list(callbacks)
    wrong = [type(cb).__name__ for cb in callbacks if not isinstance(cb, keras.callbacks.Callback)]
    if wrong:
        raise TypeError(
            f"Expected `callbacks` to be keras.callbacks.Callback objects. Received: {wrong}."
        )
    return callbacks


def _features_and_labels(x: Any, y: Any, method: str, sample_weight: Any = None) -> Any:
    """``fit(x, y, sample_weight=w)`` as Keras takes it: the one input value the data layer reads
    (a DataFrame's sample-weight column is passed to it by name, not here)."""
    from pyspark.sql import DataFrame

    if sample_weight is not None and not isinstance(sample_weight, str):
        if y is None and not isinstance(x, tuple):
            raise DataError(
                "Sample weights as an array go with a feature array and its labels, as in "
                "`fit(x, y, sample_weight=w)`; for a DataFrame pass the weight column's name."
            )
        return (*((x, y) if y is not None else x), sample_weight)
    if isinstance(sample_weight, str) and not isinstance(x, (DataFrame, str, os.PathLike)):
        raise DataError(
            f"`sample_weight={sample_weight!r}` names a DataFrame column, but the data is a "
            f"{type(x).__name__}; pass NumPy weights as an array, `fit(x, y, sample_weight=w)`."
        )
    if y is None:
        if isinstance(x, np.ndarray):
            raise DataError(
                f"`{method}` got a feature array without labels: pass them as `y`, as in "
                f"`trainer.{method}(x, y)`."
            )
        return x
    if isinstance(x, (DataFrame, tuple)) or classic.is_rdd(x):
        raise DataError(
            f"`y` is only for a feature array; a {type(x).__name__} carries its own labels "
            f"(a DataFrame in its `label` column). Drop the `y` argument."
        )
    return (x, y)


def predict_dataframe(
    df: DataFrame,
    spec: ModelSpec,
    info: DataInfo,
    features: Column,
    outputs: Mapping[str, DataType],
    kind: str,
    batch_size: int = 256,
    resources: ResourceConfig | None = None,
) -> DataFrame:
    """``df`` with the model's predictions appended, computed on the executors through Arrow.

    Lazy, like any transformation: nothing runs until an action. Every column and the row order
    are kept. The predictions come from an Arrow UDF of the features column alone, so the other
    columns (and the features) never travel to Python and back. Each Python worker builds the
    model once per model version.

    Args:
        outputs: the new columns' names and Spark SQL types, in the order
            :func:`kerasonspark._executor.prediction_arrays` gives them for ``kind``.
        kind: ``"array"``, ``"class"``, ``"binary"`` or ``"value"``.
    """
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    clash = [name for name in outputs if name in df.columns]
    if clash:
        raise DataError(
            f"The DataFrame already has the column(s) {clash}; name the prediction columns "
            "differently (`output_col` of SparkTrainer.predict, `predictionCol` or "
            "`probabilityCol` of KerasModel)."
        )
    spec_bytes = spec.to_bytes()
    body = partial(
        predict_batches,
        spec_bytes=spec_bytes,
        custom_objects=spec.custom_objects,
        info=info,
        resources=resources or ResourceConfig(),
        batch_size=batch_size,
        outputs=list(outputs),
        kind=kind,
        version=spec_version(spec_bytes),
    )
    returned = T.StructType([T.StructField(name, type_) for name, type_ in outputs.items()])
    predict = F.arrow_udf(body, returned.simpleString(), F.ArrowUDFType.SCALAR_ITER)
    predicted = predict(features)
    return df.select("*", *(predicted.getField(name).alias(name) for name in outputs))
