"""Spark ML pipelines: KerasEstimator and KerasModel fit, predict typed columns, save and load
(in a new process), and tune with CrossValidator, on real Spark and Keras."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kerasonspark import ConfigurationError, DataConfig, DataError, FailureConfig, ResourceConfig
from kerasonspark.ml import KerasEstimator, KerasModel

from conftest import make_blobs, small_model

pytestmark = pytest.mark.spark
TESTS = Path(__file__).parent
COLUMNS = [f"f{i}" for i in range(4)]


def blob_frame(spark, n=600, seed=0):
    """Blobs as a table of plain numeric columns (what a VectorAssembler takes), an id and a
    label."""
    x, y = make_blobs(n, dim=4, seed=seed)
    rows = [
        (i, *map(float, features), float(label))
        for i, (features, label) in enumerate(zip(x, y, strict=True))
    ]
    return spark.createDataFrame(rows, ["id", *COLUMNS, "label"])


def assembled(spark, n=600):
    from pyspark.ml.feature import VectorAssembler

    return VectorAssembler(inputCols=COLUMNS, outputCol="features").transform(blob_frame(spark, n))


def custom_model(main, helper):
    """A classifier with a layer from the user's script and one from a helper module."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(32, activation="relu")(helper.Offset()(main.Scale()(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(hidden))
    model.compile(
        keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model


def test_a_saved_pipeline_loads_in_a_new_session_with_identical_predictions(
    spark, user_code, tmp_path
):
    from pyspark.ml import Pipeline
    from pyspark.ml.feature import StandardScaler, VectorAssembler

    main, helper = user_code
    df = blob_frame(spark)
    estimator = KerasEstimator(
        model=custom_model(main, helper),
        backend="async",
        epochs=2,
        featuresCol="scaled",
        validationFraction=0.2,
        seed=3,
    )
    pipeline = Pipeline(
        stages=[
            VectorAssembler(inputCols=COLUMNS, outputCol="raw"),
            StandardScaler(inputCol="raw", outputCol="scaled"),
            estimator,
        ]
    )
    fitted = pipeline.fit(df)
    keras_stage = fitted.stages[-1]
    assert isinstance(keras_stage, KerasModel)
    assert keras_stage.stats["backend"] == "async"  # trained by the engine it was given
    assert len(keras_stage.history["loss"]) == 2 and len(keras_stage.history["val_accuracy"]) == 2
    fitted.write().overwrite().save(str(tmp_path / "pipeline"))
    df.write.parquet(str(tmp_path / "rows.parquet"))
    rows = (
        fitted.transform(spark.read.parquet(str(tmp_path / "rows.parquet"))).orderBy("id").collect()
    )
    assert np.mean([r.prediction == r.label for r in rows]) > 0.6  # trained (chance is 0.25)

    run = subprocess.run(
        [
            sys.executable,
            str(TESTS / "ml_loader.py"),
            str(tmp_path / "pipeline"),
            str(tmp_path / "rows.parquet"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    # the user's classes were saved as code: refused until unsafe loading is allowed
    assert loaded["refused"].startswith("ConfigurationError"), loaded["refused"]
    assert "safe_mode=False" in loaded["refused"] and "Offset" in loaded["refused"]
    assert loaded["stats_backend"] == "async"
    assert loaded["predictions"] == [r.prediction for r in rows]
    np.testing.assert_allclose(
        loaded["probabilities"], [r.probability.toArray() for r in rows], rtol=1e-6, atol=1e-7
    )


def test_classification_outputs_are_typed_for_spark_evaluators_and_keep_every_row(spark):
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql import types as T

    df = assembled(spark).repartition(3).cache()  # one fixed row order to compare with
    given = small_model(dim=4)
    before = [w.copy() for w in given.get_weights()]
    fitted = KerasEstimator(model=given, epochs=3, backend="sync").fit(df)
    # trained a copy
    assert all(np.array_equal(a, b) for a, b in zip(before, given.get_weights(), strict=True))
    out = fitted.transform(df)
    fields = {f.name: f.dataType for f in out.schema.fields}
    assert list(fields)[: len(df.columns)] == df.columns  # every column kept, in place
    assert isinstance(fields["prediction"], T.DoubleType) and isinstance(
        fields["probability"], VectorUDT
    )
    # row order kept
    assert [r.id for r in out.select("id").collect()] == [r.id for r in df.select("id").collect()]
    accuracy = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(out)
    assert accuracy > 0.9
    first = out.select("prediction", "probability").first()
    assert first.prediction == float(np.argmax(first.probability.toArray()))
    assert abs(first.probability.toArray().sum() - 1.0) < 1e-5
    assert "probability" not in fitted.copy({fitted.probabilityCol: ""}).transform(df).columns


def test_binary_and_regression_models_give_the_columns_spark_ml_expects(spark):
    import keras
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql import types as T

    df = assembled(spark, 200)
    binary = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    binary.compile("adam", "binary_crossentropy")
    out = KerasModel(binary).transform(df).select("prediction", "probability").collect()
    p = np.array([r.probability.toArray() for r in out])
    assert p.shape == (200, 2) and np.allclose(p.sum(axis=1), 1.0)
    assert [r.prediction for r in out] == [float(q[1] >= 0.5) for q in p]

    regression = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    regression.compile("adam", "mse")
    reg = KerasModel(regression).setPredictionCol("value").transform(df)
    assert (
        isinstance(reg.schema["value"].dataType, T.DoubleType) and "probability" not in reg.columns
    )
    expected = regression.predict(
        np.array([r.features.toArray() for r in df.collect()], np.float32), verbose=0
    )[:, 0]
    np.testing.assert_allclose([r.value for r in reg.collect()], expected, rtol=1e-5, atol=1e-6)

    wide = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    wide.compile("adam", "mse")
    assert isinstance(KerasModel(wide).transform(df).schema["prediction"].dataType, VectorUDT)


def test_cross_validator_tunes_the_learning_rate_and_picks_the_better_one(spark):
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.tuning import CrossValidator, ParamGridBuilder

    df = assembled(spark, 400)
    estimator = KerasEstimator(
        model=small_model(dim=4), epochs=1, batchSize=16, backend="sync", seed=0
    )
    grid = ParamGridBuilder().addGrid(estimator.learningRate, [1e-6, 0.02]).build()
    cv = CrossValidator(
        estimator=estimator,
        estimatorParamMaps=grid,
        numFolds=2,
        seed=0,
        evaluator=MulticlassClassificationEvaluator(metricName="accuracy"),
    )
    chosen = cv.fit(df)
    assert len(chosen.avgMetrics) == 2
    assert chosen.avgMetrics[1] > chosen.avgMetrics[0] + 0.2  # 1e-6 barely moves the weights
    assert isinstance(chosen.bestModel, KerasModel)
    rate = chosen.bestModel.keras_model.optimizer.learning_rate
    assert float(np.asarray(rate)) == pytest.approx(0.02)


def test_an_unfitted_estimator_saves_and_loads_its_params_and_model(spark, tmp_path):
    estimator = KerasEstimator(
        model=small_model(dim=4),
        backend="async",
        backendOptions={"rule": "adag", "window": 4},
        epochs=3,
        learningRate=0.005,
        labelCol="digit",
        failureConfig=FailureConfig(max_restarts=5, epoch_timeout=60.0),
        dataConfig=DataConfig(partition_storage="stream", buffer_rows=64),
        checkpointDir=str(tmp_path / "backups"),
    )
    estimator.save(str(tmp_path / "estimator"))
    loaded = KerasEstimator.load(str(tmp_path / "estimator"))
    assert loaded.uid == estimator.uid
    assert (
        loaded.getBackend(),
        loaded.getBackendOptions(),
        loaded.getEpochs(),
        loaded.getLearningRate(),
        loaded.getLabelCol(),
    ) == ("async", {"rule": "adag", "window": 4}, 3, 0.005, "digit")
    assert loaded.getFailureConfig() == FailureConfig(max_restarts=5, epoch_timeout=60.0)
    assert loaded.getDataConfig() == DataConfig(partition_storage="stream", buffer_rows=64)
    assert loaded.getResourceConfig() == ResourceConfig()
    assert loaded.getCheckpointDir() == str(tmp_path / "backups")
    for a, b in zip(
        loaded.getModel().get_weights(), estimator.getModel().get_weights(), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigurationError, match="not a KerasModel"):
        KerasModel.load(str(tmp_path / "estimator"))


def test_custom_objects_save_by_import_reference_or_as_code_that_loads_only_when_allowed(
    spark, user_code, tmp_path
):
    import keras

    main, helper = user_code
    # Keras's own function: installed where the model loads, so saved as "module:qualname"
    by_reference = KerasEstimator(
        model=small_model(dim=4), customObjects={"my_silu": keras.activations.silu}
    )
    by_reference.save(str(tmp_path / "reference"))
    assert not (tmp_path / "reference" / "custom_objects_by_value").exists()
    assert KerasEstimator.load(str(tmp_path / "reference")).getCustomObjects() == {
        "my_silu": keras.activations.silu
    }
    # the user's script and a module beside it: saved as code, refused in safe mode
    as_code = KerasEstimator(model=custom_model(main, helper))
    as_code.save(str(tmp_path / "code"))
    with pytest.raises(ConfigurationError, match=r"safe_mode=False.*enable_unsafe"):
        KerasEstimator.load(str(tmp_path / "code"))
    loaded = KerasEstimator.load(str(tmp_path / "code"), safe_mode=False)
    for a, b in zip(loaded.getModel().get_weights(), as_code.getModel().get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_model_saved_in_format_1_still_loads(spark, tmp_path):
    # Format 1 kept the model as a plain `model.keras` file (custom objects as a plain pickle).
    import shutil

    model = small_model(dim=4)
    KerasEstimator(model=model).save(str(tmp_path / "saved"))
    folder = tmp_path / "saved"
    (keras_bytes,) = [
        row.content for row in spark.read.parquet(str(folder / "model.keras")).collect()
    ]
    shutil.rmtree(folder / "model.keras")
    (folder / "model.keras").write_bytes(keras_bytes)
    (metadata,) = [p for p in (folder / "metadata").glob("part-*") if p.stat().st_size]
    metadata.write_text(
        metadata.read_text().replace('"kerasonspark":{"format":2', '"kerasonspark":{"format":1')
    )
    assert '"format":1' in metadata.read_text()
    (metadata.parent / f".{metadata.name}.crc").unlink(missing_ok=True)  # its checksum is stale
    loaded = KerasEstimator.load(str(folder))
    for a, b in zip(loaded.getModel().get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_estimator_reaches_the_trainers_grouped_settings(spark, tmp_path):
    # Streaming, backups and the failure settings travel from the Params to the trainer.
    from kerasonspark._backup import BackupStore, RunState

    estimator = KerasEstimator(
        model=small_model(dim=4),
        epochs=2,
        batchSize=16,
        seed=0,
        dataConfig={"partition_storage": "stream", "buffer_rows": 32},
        failureConfig=FailureConfig(max_restarts=0),
    )
    fitted = estimator.fit(assembled(spark, 200))
    assert fitted.stats["partition_storage"]["path"] == "stream"
    assert fitted.stats["partition_storage"]["chosen_by"] == "stream"
    assert len(fitted.history["loss"]) == 2
    # A backup of another model in checkpointDir: the trainer finds it there and refuses to resume
    # it.
    BackupStore(tmp_path / "backups").save(
        RunState(
            epoch=1, center=np.zeros(3, np.float32), settings={"model": "another", "engine": "sync"}
        )
    )
    with pytest.raises(
        ConfigurationError, match="backup was taken with another model architecture"
    ):
        estimator.setCheckpointDir(str(tmp_path / "backups")).fit(assembled(spark, 200))
    with pytest.raises(TypeError, match="FailureConfig or a dict"):
        KerasEstimator(failureConfig=3)
    with pytest.raises(ConfigurationError, match="partition_storage"):
        KerasEstimator().setDataConfig({"partition_storage": "disk"})


def test_bad_params_and_columns_are_refused_before_training(spark):
    import keras

    with pytest.raises(TypeError, match="not compiled"):
        KerasEstimator(model=keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
    with pytest.raises(TypeError, match="fraction"):
        KerasEstimator(validationFraction=1.5)
    with pytest.raises(TypeError, match="positive"):
        KerasEstimator(learningRate=-0.1)
    with pytest.raises(DataError, match=r"no column\(s\) \['digit'\]"):
        KerasEstimator(model=small_model(dim=4), labelCol="digit").fit(assembled(spark, 50))
    with pytest.raises(DataError, match="already has the column"):
        KerasModel(small_model(dim=4)).setPredictionCol("label").transform(assembled(spark, 50))


def test_transform_is_lazy_and_each_python_worker_builds_a_model_version_once(spark):
    from kerasonspark._executor import inference_model
    from kerasonspark._serialization import ModelSpec, spec_version

    df = assembled(spark, 100)
    tracker = spark.sparkContext.statusTracker()
    jobs = set(tracker.getJobIdsForGroup(None))
    out = KerasModel(small_model(dim=4)).transform(df)
    assert set(tracker.getJobIdsForGroup(None)) == jobs  # nothing ran, nothing was collected
    assert out.count() == 100

    model = small_model(dim=4)
    first = ModelSpec.from_model(model).to_bytes()
    built = inference_model(first, {}, 0, spec_version(first))
    # the same version: no rebuild
    assert inference_model(first, {}, 0, spec_version(first)) is built
    model.set_weights([w + 1.0 for w in model.get_weights()])
    second = ModelSpec.from_model(model).to_bytes()
    assert spec_version(second) != spec_version(first)
    rebuilt = inference_model(second, {}, 0, spec_version(second))
    assert rebuilt is not built
    np.testing.assert_array_equal(rebuilt.get_weights()[0], model.get_weights()[0])
