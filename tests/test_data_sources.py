"""Where training data comes from: NumPy arrays reach the executors by broadcast (no oversized
tasks), and a Parquet path trains like the DataFrame it holds."""

import os
from functools import partial

import numpy as np
import pytest

from kerasonspark import DataError, SparkTrainer, numpy_to_dataframe
from kerasonspark._data import DataInfo, collect_arrays, release_blocks, to_blocks
from kerasonspark._stages import run_on_partitions

from conftest import make_blobs, small_model

pytestmark = pytest.mark.spark


def test_numpy_input_travels_by_broadcast_not_inside_tasks(spark):
    from pyspark import cloudpickle

    from kerasonspark._classic import _shared_blocks

    x, y = make_blobs(4000, dim=784)  # 12.5 MB of features: parallelize would make 6 MB tasks
    model = small_model(dim=784)
    info = DataInfo.for_model(model, model.get_compile_config())
    blocks = to_blocks(spark, (x, y), "features", "label", info, 2)
    shares = blocks._kerasonspark_shares
    # what the tasks carry: the broadcasts' handles and partition numbers
    assert len(shares) == 2
    assert len(cloudpickle.dumps(partial(_shared_blocks, shares))) < 2000
    parts = run_on_partitions(blocks, lambda part: [[len(b[0]) for b in part]], info.input_shape)
    # each task read its own partition's rows, in order
    assert [sum(p) for p in parts] == [2000, 2000]
    np.testing.assert_array_equal(collect_arrays(blocks, info.input_shape)[0], x)
    release_blocks(blocks)
    assert not any(os.path.exists(share._path) for share in shares)  # destroyed with the blocks


def test_a_parquet_path_and_a_table_train_like_their_dataframe(spark, tmp_path):
    from pyspark.sql import functions as F

    x, y = make_blobs(600)
    numpy_to_dataframe(spark, x, y, features="pixels", label="digit").write.parquet(
        str(tmp_path / "train")
    )
    trainer = SparkTrainer(small_model(), num_workers=2, epochs=3, spark=spark, verbose=0, seed=0)
    result = trainer.fit(str(tmp_path / "train"), features="pixels", label="digit")
    assert result.stats["samples"] == 600 * 3  # rows x epochs
    assert trainer.evaluate(tmp_path / "train", features="pixels", label="digit")["accuracy"] > 0.9
    weighted = tmp_path / "weighted"
    numpy_to_dataframe(spark, x, y).withColumn("w", F.lit(2.0)).write.parquet(str(weighted))
    # a weight column of a Parquet file
    assert trainer.fit(str(weighted), sample_weight="w").stats["samples"] == 600 * 3
    with pytest.raises(DataError, match="holds no Parquet data Spark can read"):
        trainer.fit(str(tmp_path / "missing"))
    # A table of the catalog, as `spark.table` gives it (an external table over the Parquet folder).
    spark.read.parquet(str(tmp_path / "train")).write.option(
        "path", str(tmp_path / "table")
    ).saveAsTable("digits_table")
    try:
        assert (
            trainer.fit(spark.table("digits_table"), features="pixels", label="digit").stats[
                "samples"
            ]
            == 600 * 3
        )
    finally:
        spark.sql("DROP TABLE digits_table")


def test_numpy_to_dataframe_keeps_rows_in_order_without_data_in_its_tasks(spark, monkeypatch):
    from pyspark import cloudpickle

    x, y = make_blobs(1000, dim=784)
    sc = spark.sparkContext
    parallelized, parallelize = [], sc.parallelize
    monkeypatch.setattr(
        sc,
        "parallelize",
        lambda data, *a, **k: parallelized.append(data) or parallelize(data, *a, **k),
    )
    df = numpy_to_dataframe(spark, x, y, partitions=3).cache()
    assert sum(len(cloudpickle.dumps(list(d))) for d in parallelized) < 1000
    assert df.rdd.getNumPartitions() == 3
    rows = df.collect()
    np.testing.assert_array_equal(np.array([r.features for r in rows], np.float32), x)
    assert [r.label for r in rows] == y.tolist()
    # never more partitions than rows
    assert numpy_to_dataframe(spark, x[:2], partitions=8).count() == 2


# `async`: its epoch's center is the one when the last worker finished; sync's round-end center
# is scored the same way in test_callbacks.py.
@pytest.mark.parametrize("backend", ["async"])
def test_validation_dataframe_stays_on_the_executors_and_scores_the_returned_model(
    spark, backend, monkeypatch
):
    from kerasonspark import _data as data_module

    data, labels = make_blobs(1100)
    (x, y), (xv, yv) = (data[:800], labels[:800]), (data[800:], labels[800:])
    train_df, val_df = (
        numpy_to_dataframe(spark, x, y),
        numpy_to_dataframe(spark, xv, yv, partitions=3),
    )
    collected = []
    original = data_module.collect_arrays
    monkeypatch.setattr(
        data_module,
        "collect_arrays",
        lambda blocks, shape: collected.append(blocks) or original(blocks, shape),
    )
    trainer = SparkTrainer(
        small_model(),
        backend=backend,
        num_workers=2,
        epochs=2,
        batch_size=16,
        spark=spark,
        seed=1,
        verbose=0,
    )
    result = trainer.fit(train_df, validation_data=val_df)
    assert collected == []  # no validation row reached the driver
    assert result.history["val_accuracy"][-1] > 0.9
    # The last epoch's center is the model returned: its scores, each worker's share weighted by its
    # rows, are the ones evaluate computes on the whole set (a share left out would move the loss).
    np.testing.assert_allclose(
        result.history["val_accuracy"][-1], trainer.evaluate(val_df)["accuracy"], atol=1e-6
    )
    np.testing.assert_allclose(
        result.history["val_loss"][-1], trainer.evaluate(val_df)["loss"], rtol=1e-4
    )


def test_validation_dataframe_for_an_engine_that_scores_on_the_driver(spark):
    data, labels = make_blobs(500)
    (x, y), (xv, yv) = (data[:400], labels[:400]), (data[400:], labels[400:])
    result = SparkTrainer(
        small_model(), backend="single", epochs=2, batch_size=16, spark=spark, verbose=0
    ).fit(numpy_to_dataframe(spark, x, y), validation_data=numpy_to_dataframe(spark, xv, yv))
    assert len(result.history["val_accuracy"]) == 2 and result.history["val_accuracy"][-1] > 0.9
