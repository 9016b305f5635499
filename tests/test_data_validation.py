"""Bad input is refused with a message that says what to fix, before training starts."""

import numpy as np
import pytest

from kerasonspark import ConfigurationError, DataError, SparkTrainer
from kerasonspark.data import numpy_to_dataframe

from conftest import make_blobs, small_model

pytestmark = pytest.mark.spark


def trainer(spark, **kwargs):
    return SparkTrainer(small_model(), backend="sync", num_workers=2, spark=spark, verbose=0, **kwargs)


def test_wrong_feature_size_numpy(spark):
    x, y = make_blobs(100)
    with pytest.raises(DataError, match="16 values.*Received: features of shape \\(100, 15\\)"):
        trainer(spark).fit((x[:, :15], y))


def test_wrong_feature_size_dataframe(spark):
    x, y = make_blobs(100)
    df = numpy_to_dataframe(spark, x[:, :12], y)
    with pytest.raises(DataError, match="16 values.*length 12"):
        trainer(spark).fit(df)


def test_missing_column_lists_the_columns(spark):
    x, y = make_blobs(100)
    df = numpy_to_dataframe(spark, x, y, label="target")
    with pytest.raises(DataError, match="no label column 'label'.*'target'"):
        trainer(spark).fit(df)


def test_string_features_are_refused(spark):
    df = spark.createDataFrame([("a", 1)], ["features", "label"])
    with pytest.raises(DataError, match="array<float\\|double> or an ML Vector"):
        trainer(spark).fit(df)


def test_nan_rows_are_counted_per_partition(spark):
    x, y = make_blobs(200)
    x[3, 0] = np.nan
    x[150, 2] = np.inf
    x[151, 2] = np.nan
    df = numpy_to_dataframe(spark, x, y).repartition(2)
    with pytest.raises(DataError) as bad:
        trainer(spark).fit(df)
    text = str(bad.value)
    assert "3 row(s) with NaN or Inf" in text and "partition" in text


def test_nan_in_numpy_is_refused_before_spark(spark):
    x, y = make_blobs(100)
    x[7] = np.nan
    with pytest.raises(DataError, match="1 row\\(s\\) with NaN"):
        trainer(spark).fit((x, y))


def test_labels_out_of_range_name_the_fix(spark):
    x, y = make_blobs(100)
    y[5] = 4
    y[6] = -1
    with pytest.raises(DataError, match="2 label\\(s\\) outside the model's classes"):
        trainer(spark).fit(numpy_to_dataframe(spark, x, y))


def test_one_hot_of_wrong_width_is_refused(spark):
    x, y = make_blobs(100)
    with pytest.raises(DataError, match="width 4"):
        trainer(spark).fit((x, np.eye(5)[y % 5]))


def test_fewer_rows_than_workers(spark):
    x, y = make_blobs(1)
    with pytest.raises(DataError, match="1 row\\(s\\) for 2 workers"):
        trainer(spark).fit((x, y))


def test_more_workers_than_slots_is_refused_before_any_job(spark):
    x, y = make_blobs(100)
    with pytest.raises(ConfigurationError, match="num_workers=3.*offers 2"):
        SparkTrainer(small_model(), num_workers=3, spark=spark, verbose=0).fit((x, y))


def test_unsupported_input_type(spark):
    with pytest.raises(TypeError, match="DataFrame, an RDD"):
        trainer(spark).fit({"x": 1})
