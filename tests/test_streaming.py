"""Streamed partitions: the spill file's round trip, chunked steps equal to whole ones, and
training from spilled partitions on real Spark (paired with a validation DataFrame), leaving no
spill files behind."""

import glob
import os

import numpy as np
import pytest

from kerasonspark import ConfigurationError, DataConfig, SparkTrainer, numpy_to_dataframe
from kerasonspark._data import DataInfo
from kerasonspark._executor import LocalSteps, open_spilled, spill_partition

from conftest import make_blobs, small_model

FLOOR = 0.9


def test_a_spilled_partition_reads_back_as_the_model_takes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARK_LOCAL_DIRS", f"{tmp_path},/elsewhere")
    info = DataInfo((2, 3), "one_hot", 4)
    rng = np.random.default_rng(0)
    blocks = [
        (rng.random((5, 2, 3), np.float32), np.array([0, 1, 2, 3, 0]), None),
        (np.zeros((0, 2, 3), np.float32), np.zeros(0), None),
        (rng.random((3, 2, 3), np.float32), np.array([3, 3, 1]), np.array([0.5, 2, 1], np.float32)),
    ]
    [part] = spill_partition(info, iter(blocks))
    assert part.rows == 8 and part.weighted and os.path.dirname(part.directory) == str(tmp_path)
    x, y, w = open_spilled(part, info)
    assert not os.path.exists(part.directory)  # removed at once; the mappings stay readable
    np.testing.assert_array_equal(x, np.concatenate([blocks[0][0], blocks[2][0]]))
    np.testing.assert_array_equal(y, np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 3, 3, 1]])
    np.testing.assert_array_equal(w, [1, 1, 1, 1, 1, 0.5, 2, 1])

    [empty] = spill_partition(info, iter([]))
    x, y, w = open_spilled(empty, info)
    assert (
        x.shape == (0, 2, 3)
        and y.shape == (0, 4)
        and w is None
        and not os.path.exists(empty.directory)
    )


def test_steps_gathered_in_chunks_train_exactly_as_in_one_piece():
    import keras

    x, y = make_blobs(300)
    weights = np.random.default_rng(1).random(300).astype(np.float32)
    index = np.random.default_rng(2).permutation(300)
    trained = []
    # 70 rows: chunks of 64 (two batches), the last step of 44 rows at the end
    for max_rows in (
        None,
        70,
    ):
        model = small_model()
        model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
        steps = LocalSteps(model, DataInfo.for_model(model, model.get_compile_config()))
        steps.run(x, y.astype(np.int32), index, 32, weights, max_rows)
        trained.append(model.get_weights())
    for a, b in zip(*trained, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_streaming_is_refused_by_an_engine_that_does_not_stream():
    with pytest.raises(ConfigurationError, match="Backend 'single' .* cannot stream partitions"):
        SparkTrainer(small_model(), backend="single", data=DataConfig(partition_storage="stream"))
    with pytest.raises(ConfigurationError, match="Expected `partition_storage` in"):
        DataConfig(partition_storage="disk")
    with pytest.raises(ConfigurationError, match="buffer_rows"):
        DataConfig(buffer_rows=0)


def spill_files_left(spark):
    """Spill folders in the executors' local directories (local[2]: one executor)."""

    def left(_):
        roots = os.environ.get("SPARK_LOCAL_DIRS", "").split(",")
        yield sum(
            len(glob.glob(os.path.join(root, "kerasonspark-spill-*"))) for root in roots if root
        )

    return sum(spark.sparkContext.parallelize([0], 1).mapPartitions(left).collect())


@pytest.mark.spark
def test_async_trains_from_streamed_partitions_paired_with_a_validation_dataframe(spark):
    # sync streams from NumPy input in test_several_inputs; this is the paired path, with a
    # DataFrame.
    x, y = make_blobs(1600)
    train = numpy_to_dataframe(spark, x[:1200], y[:1200], partitions=3)
    validation = numpy_to_dataframe(spark, x[1200:], y[1200:])
    trainer = SparkTrainer(
        small_model(),
        backend="async",
        num_workers=2,
        epochs=2,
        spark=spark,
        seed=0,
        verbose=0,
        data=DataConfig(partition_storage="stream", buffer_rows=256),
    )
    result = trainer.fit(train, validation_data=validation)
    assert result.stats["partition_storage"]["path"] == "stream"
    assert result.stats["partition_storage"]["largest_partition_mb"] > 0
    assert (
        sum(w["samples"] for w in result.stats["workers"]) == 1200 and result.stats["epochs"] == 2
    )
    assert result.history["val_accuracy"][-1] > FLOOR
    assert spill_files_left(spark) == 0
