"""Spark ML pipelines: :class:`KerasEstimator` trains a Keras model with any engine,
:class:`KerasModel` predicts with it on the executors.

    from pyspark.ml import Pipeline
    from pyspark.ml.feature import VectorAssembler
    from kerasonspark.ml import KerasEstimator

    estimator = KerasEstimator(model=compiled_model, backend="async", epochs=2, labelCol="digit")
    fitted = Pipeline(stages=[VectorAssembler(inputCols=cols, outputCol="features"),
    estimator]).fit(df)
    fitted.write().overwrite().save("hdfs:///models/digits")     # PipelineModel.load(...) later
    fitted.transform(test_df).select("prediction", "probability")

Both stages save and load with Spark ML's persistence: Spark's metadata (the Params as JSON)
beside the Keras model in the ``.keras`` format, and the custom objects the model needs. The
estimator never trains the model it was given: each ``fit`` trains a fresh copy (its weights
are where training starts), so ``CrossValidator`` may fit it many times.

Outputs follow Spark ML's classifiers and regressors: a classification model (a categorical
loss, or binary cross-entropy on one sigmoid output) gives ``predictionCol`` (the class index as
a double) and ``probabilityCol`` (an ML ``Vector``); any other model gives ``predictionCol`` (a
double for one output value, else a ``Vector``). Every input column and the row order are kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import (
    HasFeaturesCol,
    HasLabelCol,
    HasPredictionCol,
    HasProbabilityCol,
    HasSeed,
)
from pyspark.ml.util import (
    DefaultParamsReader,
    DefaultParamsWriter,
    MLReadable,
    MLReader,
    MLWritable,
    MLWriter,
)

from ._classic import is_connect
from ._config import DataConfig, FailureConfig, ResourceConfig, TrainingConfig
from ._data import DataInfo, feature_column
from ._driver import ship_by_value
from ._errors import ConfigurationError, DataError
from ._serialization import ModelSpec, loss_name, referenced_custom_objects

__all__ = ["KerasEstimator", "KerasModel"]


if TYPE_CHECKING:
    import keras
    from pyspark.sql import DataFrame, SparkSession

logger = logging.getLogger(__name__)

_BINARY_LOSSES = {
    "binary_crossentropy",
    "binarycrossentropy",
    "binary_focal_crossentropy",
    "binaryfocalcrossentropy",
}
_MODEL_FILE = "model.keras"
_CUSTOM_OBJECTS_FILE = "custom_objects_by_value"
# Params that hold Python objects: saved in files of their own, not in Spark's JSON metadata.
_OBJECT_PARAMS = ("model", "customObjects")


def _to_compiled_model(value: Any) -> keras.Model:
    import keras

    if not isinstance(value, keras.Model):
        raise TypeError(f"Expected a keras.Model. Received: {type(value).__name__}.")
    if not getattr(value, "compiled", False):
        raise TypeError(
            "The model is not compiled. Call `model.compile(optimizer=..., loss=...)` first."
        )
    return value


def _to_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"Expected a dict. Received: {type(value).__name__}.")
    return dict(value)


def _to_optional_positive_float(value: Any) -> float | None:
    if value is None:
        return None
    number = TypeConverters.toFloat(value)
    if not math.isfinite(number) or number <= 0:
        raise TypeError(f"Expected a positive finite number. Received: {value!r}.")
    return number


def _to_fraction(value: Any) -> float:
    number = TypeConverters.toFloat(value)
    if not 0.0 <= number < 1.0:
        raise TypeError(f"Expected a fraction in [0, 1). Received: {value!r}.")
    return number


def _settings_converter(kind: type) -> Any:
    """A Param converter to ``kind`` (a settings dataclass), from one or from a dict of its fields
    (how Spark's JSON metadata holds it)."""

    def convert(value: Any) -> Any:
        if isinstance(value, kind):
            return value
        if isinstance(value, Mapping):
            return kind(**value)
        raise TypeError(
            f"Expected a kerasonspark.{kind.__name__} or a dict of its fields. "
            f"Received: {type(value).__name__}."
        )

    return convert


def _to_optional_string(value: Any) -> str | None:
    return None if value is None else TypeConverters.toString(value)


def _to_positive_int(value: Any) -> int:
    number = TypeConverters.toInt(value)
    if number < 1:
        raise TypeError(f"Expected a positive integer. Received: {value!r}.")
    return number


class _KerasParams(HasFeaturesCol, HasPredictionCol, HasProbabilityCol):
    """The Params an estimator and its fitted model share."""

    customObjects: Param[dict[str, Any]] = Param(
        Params._dummy(),
        "customObjects",
        "custom layers, losses and metrics the model uses, by name (saved with the model)",
        _to_dict,
    )
    predictionBatchSize: Param[int] = Param(
        Params._dummy(),
        "predictionBatchSize",
        "samples per forward pass when predicting",
        _to_positive_int,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(customObjects={}, predictionBatchSize=256)

    def getCustomObjects(self) -> dict[str, Any]:
        return self.getOrDefault(self.customObjects)

    def getPredictionBatchSize(self) -> int:
        return self.getOrDefault(self.predictionBatchSize)


class KerasEstimator(Estimator, _KerasParams, HasLabelCol, HasSeed, MLWritable, MLReadable):
    """A Spark ML ``Estimator`` that trains a compiled Keras model with a kerasonspark engine.

    Args:
        model: a built, compiled ``keras.Model``; ``fit`` trains a copy, starting from its weights.
        customObjects: custom layers, losses and metrics the model uses, by name.
        backend: the engine (``"sync"``, ``"async"``, ``"hogwild"``, ``"single"``,
            ``"elephas"``...).
        backendOptions: the engine's options, e.g. ``{"rule": "adag", "window": 5}``.
        epochs: passes over the training data, as ``SparkTrainer``'s ``epochs``.
        batchSize: samples per local step, as ``SparkTrainer``'s ``batch_size``.
        numWorkers: Spark tasks that train side by side, as ``SparkTrainer``'s ``num_workers``.
        learningRate: replaces the optimizer's learning rate (so ``CrossValidator`` can tune it);
            ``None`` keeps the compiled one.
        featuresCol: an array or ML ``Vector`` column (e.g. a ``VectorAssembler``'s output).
        labelCol: class indices (double, as ``StringIndexer`` gives), one-hot arrays, or targets.
        sampleWeightCol: a numeric column weighting each row's loss, as
            ``model.fit(sample_weight=)``.
        predictionCol: the fitted model's prediction column.
        probabilityCol: the fitted model's class probabilities (``""`` drops them).
        validationFraction: rows held out at random to score after each epoch (``val_*`` in the
            fitted model's ``history``); 0 holds none out.
        seed: seeds the data order and the validation split.
        verbose: as ``SparkTrainer``'s; 0 (the default here) prints nothing.
        checkpointDir: back the run up there at every epoch and resume from it (as
            ``SparkTrainer``'s ``checkpoint_dir``).
        failureConfig: a :class:`kerasonspark.FailureConfig` (or a dict of its fields), as
            ``SparkTrainer``'s ``failure``.
        dataConfig: a :class:`kerasonspark.DataConfig` (or a dict), as ``SparkTrainer``'s ``data``.
        resourceConfig: a :class:`kerasonspark.ResourceConfig` (or a dict), as ``SparkTrainer``'s
            ``resources``.
        predictionBatchSize: samples per forward pass of the fitted model.
    """

    model: Param[Any] = Param(
        Params._dummy(),
        "model",
        "a compiled keras.Model: architecture, compile settings and starting weights",
        _to_compiled_model,
    )
    backend: Param[str] = Param(
        Params._dummy(), "backend", "the kerasonspark engine that trains", TypeConverters.toString
    )
    backendOptions: Param[dict[str, Any]] = Param(
        Params._dummy(), "backendOptions", "the engine's options", _to_dict
    )
    epochs: Param[int] = Param(
        Params._dummy(), "epochs", "passes over the training data", _to_positive_int
    )
    batchSize: Param[int] = Param(
        Params._dummy(), "batchSize", "samples per local training step", _to_positive_int
    )
    numWorkers: Param[int] = Param(
        Params._dummy(), "numWorkers", "Spark tasks that train side by side", _to_positive_int
    )
    learningRate: Param[Any] = Param(
        Params._dummy(),
        "learningRate",
        "replaces the optimizer's learning rate (None keeps the compiled one)",
        _to_optional_positive_float,
    )
    validationFraction: Param[float] = Param(
        Params._dummy(),
        "validationFraction",
        "fraction of rows held out to score after each epoch",
        _to_fraction,
    )
    sampleWeightCol: Param[str] = Param(
        Params._dummy(),
        "sampleWeightCol",
        "a numeric column of per-row loss weights (finite, >= 0); unset weighs every row 1",
        TypeConverters.toString,
    )
    verbose: Param[int] = Param(
        Params._dummy(),
        "verbose",
        "0 silent, 1 a progress bar, 2 a line per epoch",
        TypeConverters.toInt,
    )
    checkpointDir: Param[Any] = Param(
        Params._dummy(),
        "checkpointDir",
        "back the run up here at every epoch and resume from it (None: no backups)",
        _to_optional_string,
    )
    failureConfig: Param[FailureConfig] = Param(
        Params._dummy(),
        "failureConfig",
        "restarts after a lost worker and the timeouts",
        _settings_converter(FailureConfig),
    )
    dataConfig: Param[DataConfig] = Param(
        Params._dummy(),
        "dataConfig",
        "where workers keep their partitions and how steps are shared",
        _settings_converter(DataConfig),
    )
    resourceConfig: Param[ResourceConfig] = Param(
        Params._dummy(),
        "resourceConfig",
        "what each worker may use of its machine",
        _settings_converter(ResourceConfig),
    )
    _input_kwargs: dict[str, Any]  # set by @keyword_only

    @keyword_only
    def __init__(
        self,
        *,
        model: keras.Model | None = None,
        customObjects: Mapping[str, Any] | None = None,
        backend: str = "sync",
        backendOptions: Mapping[str, Any] | None = None,
        epochs: int = TrainingConfig.epochs,
        batchSize: int = TrainingConfig.batch_size,
        numWorkers: int = TrainingConfig.num_workers,
        learningRate: float | None = None,
        featuresCol: str = "features",
        labelCol: str = "label",
        sampleWeightCol: str | None = None,
        predictionCol: str = "prediction",
        probabilityCol: str = "probability",
        validationFraction: float = 0.0,
        seed: int | None = None,
        verbose: int = 0,
        predictionBatchSize: int = 256,
        checkpointDir: str | None = None,
        failureConfig: FailureConfig | None = None,
        dataConfig: DataConfig | None = None,
        resourceConfig: ResourceConfig | None = None,
    ) -> None:
        super().__init__()
        self._setDefault(
            backend="sync",
            backendOptions={},
            epochs=TrainingConfig.epochs,
            batchSize=TrainingConfig.batch_size,
            numWorkers=TrainingConfig.num_workers,
            learningRate=None,
            validationFraction=0.0,
            verbose=0,
            checkpointDir=None,
        )
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(
        self,
        *,
        model: keras.Model | None = None,
        customObjects: Mapping[str, Any] | None = None,
        backend: str = "sync",
        backendOptions: Mapping[str, Any] | None = None,
        epochs: int = TrainingConfig.epochs,
        batchSize: int = TrainingConfig.batch_size,
        numWorkers: int = TrainingConfig.num_workers,
        learningRate: float | None = None,
        featuresCol: str = "features",
        labelCol: str = "label",
        sampleWeightCol: str | None = None,
        predictionCol: str = "prediction",
        probabilityCol: str = "probability",
        validationFraction: float = 0.0,
        seed: int | None = None,
        verbose: int = 0,
        predictionBatchSize: int = 256,
        checkpointDir: str | None = None,
        failureConfig: FailureConfig | None = None,
        dataConfig: DataConfig | None = None,
        resourceConfig: ResourceConfig | None = None,
    ) -> KerasEstimator:
        """Set the given Params (keyword arguments only)."""
        # None means "keep the default" for the seed (HasSeed's) and the settings objects.
        unset = ("seed", "failureConfig", "dataConfig", "resourceConfig")
        kwargs = {k: v for k, v in self._input_kwargs.items() if not (k in unset and v is None)}
        return self._set(**kwargs)

    # Setters in Spark ML's style, so a pipeline can be configured step by step.
    def setModel(self, value: keras.Model) -> KerasEstimator:
        return self._set(model=value)

    def setBackend(self, value: str) -> KerasEstimator:
        return self._set(backend=value)

    def setBackendOptions(self, value: Mapping[str, Any]) -> KerasEstimator:
        return self._set(backendOptions=value)

    def setEpochs(self, value: int) -> KerasEstimator:
        return self._set(epochs=value)

    def setBatchSize(self, value: int) -> KerasEstimator:
        return self._set(batchSize=value)

    def setNumWorkers(self, value: int) -> KerasEstimator:
        return self._set(numWorkers=value)

    def setLearningRate(self, value: float | None) -> KerasEstimator:
        return self._set(learningRate=value)

    def setValidationFraction(self, value: float) -> KerasEstimator:
        return self._set(validationFraction=value)

    def setCheckpointDir(self, value: str | None) -> KerasEstimator:
        return self._set(checkpointDir=value)

    def setFailureConfig(self, value: FailureConfig) -> KerasEstimator:
        return self._set(failureConfig=value)

    def setDataConfig(self, value: DataConfig) -> KerasEstimator:
        return self._set(dataConfig=value)

    def setResourceConfig(self, value: ResourceConfig) -> KerasEstimator:
        return self._set(resourceConfig=value)

    def setFeaturesCol(self, value: str) -> KerasEstimator:
        return self._set(featuresCol=value)

    def setLabelCol(self, value: str) -> KerasEstimator:
        return self._set(labelCol=value)

    def setSampleWeightCol(self, value: str) -> KerasEstimator:
        return self._set(sampleWeightCol=value)

    def setPredictionCol(self, value: str) -> KerasEstimator:
        return self._set(predictionCol=value)

    def setProbabilityCol(self, value: str) -> KerasEstimator:
        return self._set(probabilityCol=value)

    def getModel(self) -> keras.Model:
        if not self.isDefined(self.model):
            raise ConfigurationError(
                "KerasEstimator has no model: pass `model=` (a compiled keras.Model) or call "
                "`setModel`."
            )
        return self.getOrDefault(self.model)

    def getBackend(self) -> str:
        return self.getOrDefault(self.backend)

    def getBackendOptions(self) -> dict[str, Any]:
        return self.getOrDefault(self.backendOptions)

    def getEpochs(self) -> int:
        return self.getOrDefault(self.epochs)

    def getBatchSize(self) -> int:
        return self.getOrDefault(self.batchSize)

    def getNumWorkers(self) -> int:
        return self.getOrDefault(self.numWorkers)

    def getLearningRate(self) -> float | None:
        return self.getOrDefault(self.learningRate)

    def getSampleWeightCol(self) -> str | None:
        return (
            self.getOrDefault(self.sampleWeightCol)
            if self.isDefined(self.sampleWeightCol)
            else None
        )

    def getValidationFraction(self) -> float:
        return self.getOrDefault(self.validationFraction)

    def getCheckpointDir(self) -> str | None:
        return self.getOrDefault(self.checkpointDir)

    # The settings objects keep their defaults in their own classes: unset Params stand for those.
    def getFailureConfig(self) -> FailureConfig:
        return (
            self.getOrDefault(self.failureConfig)
            if self.isDefined(self.failureConfig)
            else FailureConfig()
        )

    def getDataConfig(self) -> DataConfig:
        return (
            self.getOrDefault(self.dataConfig) if self.isDefined(self.dataConfig) else DataConfig()
        )

    def getResourceConfig(self) -> ResourceConfig:
        return (
            self.getOrDefault(self.resourceConfig)
            if self.isDefined(self.resourceConfig)
            else ResourceConfig()
        )

    def _fit(self, dataset: DataFrame) -> KerasModel:
        from ._trainer import SparkTrainer

        weight = self.getSampleWeightCol()
        missing = [
            c
            for c in (self.getFeaturesCol(), self.getLabelCol(), weight)
            if c and c not in dataset.columns
        ]
        if missing:
            raise DataError(
                f"The DataFrame has no column(s) {missing}. Its columns: {dataset.columns}. Set "
                "`featuresCol`, `labelCol` (and `sampleWeightCol`) to the right names."
            )
        custom_objects = self.getCustomObjects()
        # a copy: the Param's model stays as given
        model = ModelSpec.from_model(self.getModel(), custom_objects).build()
        rate = self.getLearningRate()
        if rate is not None:
            _set_learning_rate(model, rate)
        train, validation = dataset, None
        if self.getValidationFraction() > 0:
            fraction = self.getValidationFraction()
            train, validation = dataset.randomSplit([1.0 - fraction, fraction], seed=self.getSeed())
        trainer = SparkTrainer(
            model,
            backend=self.getBackend(),
            num_workers=self.getNumWorkers(),
            batch_size=self.getBatchSize(),
            epochs=self.getEpochs(),
            backend_options=self.getBackendOptions(),
            spark=dataset.sparkSession,
            seed=self.getSeed() % 2**31,  # HasSeed's default (a hash) may be negative
            verbose=self.getOrDefault(self.verbose),
            custom_objects=custom_objects,
            checkpoint_dir=self.getCheckpointDir(),
            failure=self.getFailureConfig(),
            data=self.getDataConfig(),
            resources=self.getResourceConfig(),
        )
        result = trainer.fit(
            train,
            features=self.getFeaturesCol(),
            label=self.getLabelCol(),
            validation_data=validation,
            sample_weight=weight or None,
        )
        fitted = KerasModel(result.model, history=result.history, stats=result.stats)
        return self._copyValues(fitted)

    def write(self) -> MLWriter:
        """A writer that saves the Params and the (untrained) model."""
        return _KerasWriter(self)

    @classmethod
    def read(cls) -> MLReader:
        return _KerasReader(cls)

    @classmethod
    def load(cls, path: str, safe_mode: bool | None = None) -> KerasEstimator:
        """The estimator saved at ``path``.

        Args:
            safe_mode: ``False`` allows custom objects that were saved as pickled code (their
                modules were not installed where they were saved); ``None`` follows Keras's
                ``keras.config.enable_unsafe_deserialization()``. Objects saved by import
                reference always load.
        """
        return _KerasReader(cls, safe_mode).load(path)


class KerasModel(Model, _KerasParams, MLWritable, MLReadable):
    """A Spark ML ``Transformer`` that predicts with a trained Keras model on the executors.

    ``KerasEstimator.fit`` returns one; wrap a model trained elsewhere with ``KerasModel(model)``.

    Attributes:
        keras_model: the trained ``keras.Model``.
        history: per-epoch loss and metrics of the training run (``{}`` if it was not trained here).
        stats: the training run's figures (engine, samples/s, seconds...).
    """

    def __init__(
        self,
        keras_model: keras.Model | None = None,
        *,
        history: Mapping[str, list[float]] | None = None,
        stats: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.keras_model = _to_compiled_model(keras_model) if keras_model is not None else None
        self.history = dict(history or {})
        self.stats = dict(stats or {})

    def setFeaturesCol(self, value: str) -> KerasModel:
        return self._set(featuresCol=value)

    def setPredictionCol(self, value: str) -> KerasModel:
        return self._set(predictionCol=value)

    def setProbabilityCol(self, value: str) -> KerasModel:
        return self._set(probabilityCol=value)

    def setCustomObjects(self, value: Mapping[str, Any]) -> KerasModel:
        return self._set(customObjects=value)

    def setPredictionBatchSize(self, value: int) -> KerasModel:
        return self._set(predictionBatchSize=value)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        from pyspark.ml.functions import array_to_vector
        from pyspark.sql import functions as F
        from pyspark.sql import types as T

        from ._shipping import ensure_executors_ready
        from ._trainer import predict_dataframe

        if self.keras_model is None:
            raise ConfigurationError(
                "This KerasModel holds no Keras model: create it with `KerasModel(model)`."
            )
        model = self.keras_model
        info = DataInfo.for_model(model, model.get_compile_config())
        if info.inputs or info.outputs:
            raise ConfigurationError(
                "KerasModel takes models with one input and one output (one features column, one "
                "prediction); use SparkTrainer.predict for a model with several."
            )
        kind = prediction_kind(model, info)
        prediction, probability = self.getPredictionCol(), self.getProbabilityCol()
        if kind == "value":
            width = math.prod(int(d) for d in model.output_shape[1:])
            outputs = {prediction: T.DoubleType() if width == 1 else T.ArrayType(T.DoubleType())}
        else:
            outputs = {
                prediction: T.DoubleType(),
                probability or "__kerasonspark_probability": T.ArrayType(T.DoubleType()),
            }
        spec = ModelSpec.from_model(model, self.getCustomObjects())
        ensure_executors_ready(dataset.sparkSession)
        features = feature_column(dataset, self.getFeaturesCol(), "prediction")
        out = predict_dataframe(
            dataset, spec, info, features, outputs, kind, self.getPredictionBatchSize()
        )
        for name, type_ in outputs.items():
            if isinstance(type_, T.ArrayType):
                out = out.withColumn(name, array_to_vector(F.col(name)))
        return out if probability or kind == "value" else out.drop("__kerasonspark_probability")

    def write(self) -> MLWriter:
        """A writer that saves the Params, the trained model, its history and stats."""
        return _KerasWriter(self)

    @classmethod
    def read(cls) -> MLReader:
        return _KerasReader(cls)

    @classmethod
    def load(cls, path: str, safe_mode: bool | None = None) -> KerasModel:
        """The model saved at ``path``.

        Args:
            safe_mode: ``False`` allows custom objects that were saved as pickled code (their
                modules were not installed where they were saved); ``None`` follows Keras's
                ``keras.config.enable_unsafe_deserialization()``. Objects saved by import
                reference always load.
        """
        return _KerasReader(cls, safe_mode).load(path)


def prediction_kind(model: keras.Model, info: DataInfo) -> str:
    """How a model's outputs read as Spark ML columns: ``"class"`` for a categorical loss,
    ``"binary"`` for binary cross-entropy on one output, else ``"value"``."""
    if info.label_mode in ("sparse", "one_hot"):
        return "class"
    width = math.prod(int(d) for d in model.output_shape[1:])
    if loss_name(model.get_compile_config()) in _BINARY_LOSSES and width == 1:
        return "binary"
    return "value"


def _set_learning_rate(model: keras.Model, rate: float) -> None:
    try:
        model.optimizer.learning_rate = rate
    except TypeError:  # Keras refuses to replace a LearningRateSchedule
        raise ConfigurationError(
            "The model's optimizer follows a LearningRateSchedule, so `learningRate` cannot "
            "replace its rate. Compile with a fixed rate, or leave `learningRate` unset."
        ) from None


# -- persistence ------------------------------------------------------------------------------


def _write_bytes(spark: SparkSession, path: str, data: bytes) -> None:
    """``data`` saved at ``path`` as a one-row Parquet folder (a DataFrame write: any store Spark
    saves to, from a classic session or a Spark Connect client alike)."""
    spark.createDataFrame([(bytearray(data),)], "content binary").coalesce(1).write.mode(
        "overwrite"
    ).parquet(path)


def _read_bytes(spark: SparkSession, path: str, saved_as: str = "parquet") -> bytes | None:
    """What :func:`_write_bytes` saved at ``path`` (``saved_as="binaryFile"``: a plain file, as
    format 1 saved them), or ``None`` where nothing is."""
    from pyspark.errors import AnalysisException

    try:
        row = spark.read.format(saved_as).load(path).select("content").first()
    except AnalysisException:
        return None
    return bytes(row[0]) if row is not None else None


def _by_reference(obj: Any) -> str | None:
    """``"module:qualname"`` for an object a loading process can import as it is (a module that
    is installed, or Keras's, TensorFlow's or kerasonspark's own), else ``None``."""
    import importlib

    from ._driver import is_installed_module

    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not name or module == "__main__" or not is_installed_module(module):
        return None
    try:
        found: Any = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}:{name}" if found is obj else None


def _import_reference(reference: str) -> Any:
    import importlib

    module, _, name = reference.partition(":")
    found: Any = importlib.import_module(module)
    for part in name.split("."):
        found = getattr(found, part)
    return found


def _unsafe_allowed(safe_mode: bool | None) -> bool:
    """Whether pickled code may be loaded: ``safe_mode=False`` given, or, left unset, Keras's own
    switch (``keras.config.enable_unsafe_deserialization()``)."""
    if safe_mode is not None:
        return not safe_mode
    from keras.src.saving.serialization_lib import in_safe_mode

    # what keras.config.enable_unsafe_deserialization() sets (Keras has no public getter)
    return in_safe_mode() is False


def _jsonable(value: Any) -> Any:
    """Figures as JSON takes them (NumPy numbers as Python numbers, anything else as text)."""
    return json.loads(
        json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    )


class _KerasWriter(MLWriter):
    """Spark's JSON metadata (every Param but the model and custom objects), the Keras model's
    ``.keras`` bytes, and the custom objects: by import reference (``"module:qualname"``, in
    the metadata) where the module is installed, else pickled by cloudpickle, as Spark ships
    functions to executors (loading those runs their code: refused unless asked for, as Keras's
    ``safe_mode`` refuses lambdas)."""

    def __init__(self, instance: KerasEstimator | KerasModel) -> None:
        super().__init__()
        self.instance = instance

    def _handleOverwrite(self, path: str) -> None:
        # Spark ML deletes the folder through the JVM, which a Spark Connect client cannot
        # reach; there every part is written in overwrite mode, and the reader reads only the
        # parts the metadata names.
        if not is_connect(self.sparkSession):
            super()._handleOverwrite(path)

    def saveImpl(self, path: str) -> None:
        from pyspark import cloudpickle

        instance = self.instance
        # Settings objects are saved as dicts of their fields; their Params' converters read them
        # back.
        params = {
            p.name: dataclasses.asdict(v)
            if dataclasses.is_dataclass(v) and not isinstance(v, type)
            else v
            for p, v in instance._paramMap.items()
            if p.name not in _OBJECT_PARAMS
        }
        extra: dict[str, Any] = {"kerasonspark": {"format": 2}}
        if isinstance(instance, KerasModel):
            model = instance.keras_model
            extra["kerasonspark"].update(
                history=_jsonable(instance.history), stats=_jsonable(instance.stats)
            )
        else:
            model = (
                instance.getOrDefault(instance.model)
                if instance.isDefined(instance.model)
                else None
            )
        # Also the registered objects the model names: a new process has not registered them.
        custom_objects = {
            **(
                referenced_custom_objects(model.to_json(), model.get_compile_config())
                if model
                else {}
            ),
            **instance.getCustomObjects(),
        }
        references = {name: _by_reference(obj) for name, obj in custom_objects.items()}
        by_value = {name: obj for name, obj in custom_objects.items() if references[name] is None}
        for obj in by_value.values():
            ship_by_value(obj)
        extra["kerasonspark"]["custom_objects"] = {
            name: ref for name, ref in references.items() if ref is not None
        }
        extra["kerasonspark"]["custom_objects_by_value"] = sorted(by_value)
        extra["kerasonspark"]["model"] = model is not None
        # Spark's metadata, as DefaultParamsWriter.saveMetadata writes it, but overwriting: over
        # Spark Connect nothing deletes the folder first (see _handleOverwrite)
        metadata = DefaultParamsWriter._get_metadata_to_save(
            instance, self.sparkSession, extraMetadata=extra, paramMap=params
        )
        self.sparkSession.createDataFrame([(metadata,)], schema=["value"]).coalesce(1).write.mode(
            "overwrite"
        ).text(os.path.join(path, "metadata"))
        if model is not None:
            with tempfile.TemporaryDirectory(prefix="kerasonspark-save-") as folder:
                local = os.path.join(folder, _MODEL_FILE)
                model.save(local)
                with open(local, "rb") as file:
                    _write_bytes(self.sparkSession, os.path.join(path, _MODEL_FILE), file.read())
        if by_value:
            _write_bytes(
                self.sparkSession,
                os.path.join(path, _CUSTOM_OBJECTS_FILE),
                cloudpickle.dumps(by_value),
            )


def _register(custom_objects: Mapping[str, Any]) -> None:
    """Register with Keras the loaded objects that were registered when saved (``"package>Name"``),
    so the loaded model names them as the saved one did and its executors find them."""
    import keras

    registered = keras.saving.get_custom_objects()
    for name, obj in custom_objects.items():
        package, _, short = name.rpartition(">")
        if package and name not in registered:
            keras.saving.register_keras_serializable(package=package, name=short)(obj)


class _KerasReader(MLReader):
    def __init__(
        self, cls: type[KerasEstimator] | type[KerasModel], safe_mode: bool | None = None
    ) -> None:
        super().__init__()
        self.cls = cls
        self.safe_mode = safe_mode

    def _custom_objects(self, path: str, saved: dict[str, Any]) -> dict[str, Any]:
        """The saved custom objects: imported by reference, and those saved by value unpickled
        only where unsafe loading is allowed.

        Raises:
            ConfigurationError: objects were saved by value (pickled code) and safe mode is on.
        """
        import pickle

        format_1 = saved.get("format", 1) == 1
        by_value = saved.get("custom_objects_by_value", [])
        raw = (
            _read_bytes(
                self.sparkSession, os.path.join(path, "custom_objects.cloudpickle"), "binaryFile"
            )
            if format_1
            else _read_bytes(self.sparkSession, os.path.join(path, _CUSTOM_OBJECTS_FILE))
            if by_value
            else None
        )
        if raw is not None and not _unsafe_allowed(self.safe_mode):
            names = ", ".join(by_value) or "its custom objects"
            raise ConfigurationError(
                f"{path} holds {names} as pickled code (their modules were not installed where "
                "it was saved), and loading them runs that code. If you trust the folder, load "
                "with KerasModel.load(path, safe_mode=False) (KerasEstimator likewise), or call "
                "keras.config.enable_unsafe_deserialization() first (PipelineModel.load); "
                "otherwise install their modules where the model is saved, so it saves them by "
                "import reference."
            )
        custom_objects = pickle.loads(raw) if raw is not None else {}
        for name, reference in saved.get("custom_objects", {}).items():
            custom_objects[name] = _import_reference(reference)
        return custom_objects

    def load(self, path: str) -> Any:
        import keras

        metadata = DefaultParamsReader.loadMetadata(path, self.sparkSession)
        if metadata["class"] != f"{self.cls.__module__}.{self.cls.__name__}":
            raise ConfigurationError(
                f"{path} holds a {metadata['class']}, not a {self.cls.__name__}: load it with "
                f"that class (or PipelineModel.load for a pipeline)."
            )
        saved = metadata.get("kerasonspark", {})
        custom_objects = self._custom_objects(path, saved)
        _register(custom_objects)
        format_1 = saved.get("format", 1) == 1
        data = (
            _read_bytes(self.sparkSession, os.path.join(path, _MODEL_FILE), "binaryFile")
            if format_1
            else _read_bytes(self.sparkSession, os.path.join(path, _MODEL_FILE))
            if saved.get("model")
            else None
        )
        model = None
        if data is not None:
            with tempfile.TemporaryDirectory(prefix="kerasonspark-load-") as folder:
                local = os.path.join(folder, _MODEL_FILE)
                with open(local, "wb") as file:
                    file.write(data)
                model = keras.saving.load_model(local, custom_objects=custom_objects, compile=True)
        instance: Any
        if self.cls is KerasModel:
            instance = KerasModel(model, history=saved.get("history"), stats=saved.get("stats"))
        else:
            instance = KerasEstimator()
            if model is not None:
                instance.setModel(model)
        instance._resetUid(metadata["uid"])
        DefaultParamsReader.getAndSetParams(instance, metadata)
        if custom_objects:
            instance._set(customObjects=custom_objects)
        return instance
