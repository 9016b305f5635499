"""Bad input is refused with a message that says what to fix, before training starts.

The one-line cases are rows of the bad-input catalogue (docs/guide/bad-input.md,
tests/test_bad_input_catalogue.py); the
cases here check more than one message.
"""

import numpy as np
import pytest

from kerasonspark import DataError, SparkTrainer, numpy_to_dataframe

from conftest import make_blobs, small_model

pytestmark = pytest.mark.spark


def trainer(spark, **kwargs):
    return SparkTrainer(
        small_model(), backend="sync", num_workers=2, spark=spark, verbose=0, **kwargs
    )


def test_nan_rows_are_counted_per_partition(spark):
    x, y = make_blobs(200)
    x[3, 0] = np.nan
    x[150, 2] = np.inf
    x[151, 2] = np.nan
    df = numpy_to_dataframe(spark, x, y).repartition(2)
    with pytest.raises(DataError) as bad:
        trainer(spark).fit(df)
    text = str(bad.value)
    assert "3 row(s) with NaN, Inf or null" in text and "partition" in text


def test_fit_and_evaluate_take_x_and_y_like_keras(spark):
    x, y = make_blobs(200)
    trainer = SparkTrainer(small_model(), spark=spark, epochs=2, verbose=0)
    result = trainer.fit(x, y, validation_data=(x, y))
    assert result.history["val_accuracy"][-1] > 0.5
    assert trainer.evaluate(x, y)["accuracy"] == pytest.approx(
        result.history["val_accuracy"][-1], abs=1e-6
    )
    with pytest.raises(DataError, match="without labels: pass them as `y`"):
        trainer.fit(x)
    with pytest.raises(DataError, match="carries its own labels"):
        trainer.evaluate(numpy_to_dataframe(spark, x, y), y)


def test_predict_checks_the_feature_size_before_returning_a_lazy_frame(spark):
    x, y = make_blobs(40)
    with pytest.raises(DataError, match="16 values"):
        trainer(spark).predict(x[:, :15])
    with pytest.raises(DataError, match="16 values"):
        trainer(spark).predict(numpy_to_dataframe(spark, x[:, :15], y))
    with pytest.raises(DataError, match="no features column 'pixels'"):
        trainer(spark).predict(numpy_to_dataframe(spark, x, y), features="pixels")


def test_null_labels_and_empty_arrays_are_named(spark):
    x, y = make_blobs(100)
    df = numpy_to_dataframe(spark, x, y).selectExpr(
        "features", "IF(label = 1, NULL, label) AS label"
    )
    with pytest.raises(DataError, match=f"{int((y == 1).sum())} row\\(s\\) with NaN, Inf or null"):
        trainer(spark).fit(df)
    with pytest.raises(DataError, match="The training features hold no samples"):
        trainer(spark).fit(x[:0], y[:0])
