"""Sample and class weights: the arithmetic of a weighted step, every engine honouring a weight
column (rows of weight 0 with wrong labels are ignored), and class weights as row weights, through
real Spark."""

import numpy as np
import pytest

from kerasonspark import ConfigurationError, DataError, SparkTrainer, numpy_to_dataframe
from kerasonspark._data import DataInfo
from kerasonspark._executor import LocalSteps

from conftest import make_blobs, small_model


def sgd_steps(rate, x, y, weights, batch):
    import keras

    model = small_model()
    model.compile(keras.optimizers.SGD(rate), "sparse_categorical_crossentropy")
    steps = LocalSteps(model, DataInfo.for_model(model, model.get_compile_config()))
    steps.run(x, y.astype(np.int32), np.arange(len(x)), batch, weights)
    return model.get_weights()


def test_a_weighted_step_scales_each_rows_loss():
    x, y = make_blobs(64)
    # Weight 2 on every row is the same SGD step as twice the learning rate.
    doubled = sgd_steps(0.05, x, y, np.full(64, 2.0, np.float32), 16)
    faster = sgd_steps(0.1, x, y, None, 16)
    for a, b in zip(doubled, faster, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Rows of weight 0 add nothing: [2, 2, 0, 0] per batch of 4 is the same step as the first two
    # rows alone.
    half = np.tile(np.array([2, 2, 0, 0], np.float32), 16)
    kept = np.tile(np.array([True, True, False, False]), 16)
    for a, b in zip(
        sgd_steps(0.05, x, y, half, 4), sgd_steps(0.05, x[kept], y[kept], None, 2), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def noisy_rows(n=800):
    """Clean rows (weight 1) and twice the same features labelled as the next class (weight 0):
    unweighted, a model learns the wrong class (accuracy near 0 on the clean rows)."""
    x, y = make_blobs(n)
    wrong = (y + 1) % 4
    return (
        np.concatenate([x, x, x]),
        np.concatenate([y, wrong, wrong]),
        np.concatenate([np.ones(n, np.float32), np.zeros(2 * n, np.float32)]),
        (x, y),
    )


@pytest.mark.spark
@pytest.mark.parametrize("backend", ["sync", "async", "hogwild", "single"])
def test_every_engine_ignores_rows_of_weight_zero(spark, backend):
    import pyarrow as pa

    x, y, w, (clean_x, clean_y) = noisy_rows()
    df = numpy_to_dataframe(spark, x, y)
    df = spark.createDataFrame(
        pa.table(
            {"features": df.toArrow()["features"], "label": pa.array(y), "weight": pa.array(w)}
        )
    )
    trainer = SparkTrainer(
        small_model(), backend=backend, num_workers=2, epochs=3, spark=spark, seed=0, verbose=0
    )
    trainer.fit(df.repartition(2), sample_weight="weight")
    # unweighted, two thirds of the labels are wrong
    assert trainer.evaluate((clean_x, clean_y))["accuracy"] > 0.9


@pytest.mark.spark
def test_numpy_weights_train_and_bad_weights_are_refused_before_training(spark):
    x, y, w, (clean_x, clean_y) = noisy_rows(400)
    trainer = SparkTrainer(
        small_model(), backend="sync", num_workers=2, epochs=3, spark=spark, seed=0, verbose=0
    )
    trainer.fit(x, y, sample_weight=w)
    assert trainer.evaluate((clean_x, clean_y))["accuracy"] > 0.9
    with pytest.raises(
        DataError, match="1 sample weight\\(s\\) that are negative, NaN, Inf or null"
    ):
        trainer.fit(x, y, sample_weight=np.where(np.arange(len(w)) == 5, -1.0, w))
    with pytest.raises(DataError, match="names a DataFrame column"):
        trainer.fit(x, y, sample_weight="weight")
    df = numpy_to_dataframe(spark, x, y)
    with pytest.raises(DataError, match="no sample-weight column 'weight'"):
        trainer.fit(df, sample_weight="weight")
    with pytest.raises(
        ConfigurationError, match="Backend 'elephas' cannot train with sample or class weights"
    ):
        SparkTrainer(small_model(), backend="elephas", spark=spark, verbose=0).fit(
            x, y, sample_weight=w
        )


@pytest.mark.spark
def test_keras_estimator_takes_a_sample_weight_column(spark):
    import pyarrow as pa

    from kerasonspark.ml import KerasEstimator

    x, y, w, (clean_x, clean_y) = noisy_rows(400)
    df = spark.createDataFrame(
        pa.table(
            {
                "features": numpy_to_dataframe(spark, x).toArrow()["features"],
                "label": pa.array(y.astype(np.float64)),
                "w": pa.array(w),
            }
        )
    )
    fitted = KerasEstimator(model=small_model(), epochs=3, sampleWeightCol="w", seed=0).fit(df)
    assert fitted.getOrDefault("featuresCol") == "features"
    clean = numpy_to_dataframe(spark, clean_x, clean_y)
    rows = fitted.transform(clean).select("label", "prediction").collect()
    assert np.mean([r.label == r.prediction for r in rows]) > 0.9


def test_class_weights_become_each_rows_weight():
    from kerasonspark._data import class_weighted, dense_class_weight

    info = DataInfo((4,), "sparse", 3)
    dense = dense_class_weight({0: 2.0, 2: 0}, info)
    assert dense == (2.0, 1.0, 0.0)  # class 1 left out: weight 1
    np.testing.assert_array_equal(class_weighted(np.array([0, 1, 2, 2]), None, dense), [2, 1, 0, 0])
    np.testing.assert_array_equal(
        class_weighted(np.eye(3)[[2, 0]], np.array([0.5, 3.0], np.float32), dense), [0, 6]
    )
    assert class_weighted(np.array([0, 1]), None, None) is None
    with pytest.raises(ConfigurationError, match="has class 3; the model's classes are 0..2"):
        dense_class_weight({3: 1.0}, info)
    with pytest.raises(
        ConfigurationError, match=r"`class_weight\[1\]` must be a finite number >= 0"
    ):
        dense_class_weight({1: float("nan")}, info)
    with pytest.raises(ConfigurationError, match="needs a classification loss"):
        dense_class_weight({0: 1.0}, DataInfo((4,), "raw", None, (1,)))


@pytest.mark.spark
@pytest.mark.parametrize("backend", ["sync", "single"])  # the worker loop's path and the driver's
def test_a_class_of_weight_zero_is_never_learned(spark, backend):
    x, y = make_blobs(800)
    trainer = SparkTrainer(
        small_model(), backend=backend, num_workers=2, epochs=3, spark=spark, seed=0, verbose=0
    )
    trainer.fit(x, y, class_weight={0: 0.0})
    predicted = trainer.model.predict(x, verbose=0).argmax(axis=1)
    assert (predicted[y != 0] == y[y != 0]).mean() > 0.9
    assert (predicted[y == 0] == 0).mean() < 0.2
