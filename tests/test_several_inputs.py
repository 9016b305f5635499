"""Models with several inputs and outputs: packing and unpacking (pure), and a two-input,
two-output model trained with sample weights by every engine on real Spark, from DataFrame
columns and from NumPy lists, then evaluated and used for predictions."""

import numpy as np
import pytest

from kerasonspark import ConfigurationError, DataConfig, DataError, SparkTrainer
from kerasonspark._data import DataInfo

from conftest import make_blobs

FLOOR = 0.9


def two_headed(named: bool = False, seed: int = 0):
    """Inputs "image" (4x4) and "meta" (2); outputs "digit" (4 classes) and "parity" (sigmoid)."""
    import keras

    keras.utils.set_random_seed(seed)
    image, meta = keras.Input((4, 4), name="image"), keras.Input((2,), name="meta")
    hidden = keras.layers.Dense(32, activation="relu")(
        keras.layers.Concatenate()([keras.layers.Flatten()(image), meta])
    )
    digit = keras.layers.Dense(4, activation="softmax", name="digit")(hidden)
    parity = keras.layers.Dense(1, activation="sigmoid", name="parity")(hidden)
    if named:
        model = keras.Model({"image": image, "meta": meta}, {"digit": digit, "parity": parity})
        losses = {"digit": "sparse_categorical_crossentropy", "parity": "binary_crossentropy"}
    else:
        model = keras.Model([image, meta], [digit, parity])
        losses = ["sparse_categorical_crossentropy", "binary_crossentropy"]
    model.compile(
        keras.optimizers.Adam(0.01),
        losses,
        metrics=[["accuracy"], ["accuracy"]]
        if not named
        else {"digit": ["accuracy"], "parity": ["accuracy"]},
    )
    return model


def noisy_two_headed_rows(n=600, seed=0):
    """Clean rows (weight 1) and the same features twice with the wrong labels (weight 0)."""
    x, y = make_blobs(n, seed=seed)
    meta = np.random.default_rng(seed).normal(size=(n, 2)).astype(np.float32)
    wrong = (y + 1) % 4
    image = np.concatenate([x, x, x]).reshape(-1, 4, 4)
    digits = np.concatenate([y, wrong, wrong])
    weights = np.concatenate([np.ones(n, np.float32), np.zeros(2 * n, np.float32)])
    clean = ([x.reshape(-1, 4, 4), meta], [y, (y % 2).astype(np.float32)])
    return (
        image,
        np.concatenate([meta, meta, meta]),
        digits,
        (digits % 2).astype(np.float32),
        weights,
        clean,
    )


def test_features_and_labels_pack_and_unpack_as_the_model_takes_them():
    info = DataInfo.for_model(two_headed(), two_headed().get_compile_config())
    assert info.inputs == (("image", (4, 4)), ("meta", (2,))) and info.input_shape == (18,)
    assert [(name, one.label_mode) for name, one in info.outputs] == [
        ("digit", "sparse"),
        ("parity", "raw"),
    ]
    image, meta = np.arange(2 * 16).reshape(2, 4, 4), np.array([[7, 8], [9, 10]])
    packed = info.pack_features([image, meta], "the features")
    assert packed.shape == (2, 18) and packed.dtype == np.float32
    got_image, got_meta = info.model_inputs(packed)
    np.testing.assert_array_equal(got_image, image)
    np.testing.assert_array_equal(got_meta, meta)
    # One-hot digits become indices for the sparse loss; parity stays a value.
    labels = info.pack_labels(
        {"digit": np.eye(4)[[3, 1]], "parity": np.array([1.0, 0.0])}, "the labels"
    )
    digit, parity = info.model_targets(labels)
    assert (
        digit.dtype == np.int32 and digit.tolist() == [3, 1] and parity.tolist() == [[1.0], [0.0]]
    )

    named = two_headed(named=True)
    named_info = DataInfo.for_model(named, named.get_compile_config())
    assert named_info.named and set(named_info.model_inputs(packed)) == {"image", "meta"}
    with pytest.raises(
        DataError,
        match=r"The model has 2 inputs \['image', 'meta'\]; pass feature arrays .* Received: 1",
    ):
        info.pack_features([image], "the features")
    with pytest.raises(
        DataError, match=r"The output 'digit' data .* 1 label\(s\) outside the model's classes"
    ):
        info.pack_labels([np.array([0, 4]), np.array([1.0, 0.0])], "the labels")
    with pytest.raises(DataError, match=r"input 'meta'"):
        info.pack_features([image, np.zeros((2, 3))], "the features")


def dataframe_of(spark, image, meta, digit, parity, weight=None):
    import pyarrow as pa

    columns = {
        "image": pa.array(list(image.reshape(len(image), -1))),
        "meta": pa.array(list(meta)),
        "digit": pa.array(digit),
        "parity": pa.array(parity),
    }
    if weight is not None:
        columns["weight"] = pa.array(weight)
    return spark.createDataFrame(pa.table(columns)).repartition(2)


@pytest.mark.spark
# The shared worker loop (`async`; `sync` and `hogwild` carry the packed rows through the same loop,
# and `sync` trains them from NumPy in test_numpy_lists_...) and the driver (`single`).
@pytest.mark.parametrize("backend", ["async", "single"])
def test_every_engine_trains_two_inputs_and_two_outputs_with_sample_weights(spark, backend):
    image, meta, digit, parity, weight, (clean_x, clean_y) = noisy_two_headed_rows()
    train = dataframe_of(spark, image, meta, digit, parity, weight)
    validation = dataframe_of(spark, *clean_x, *clean_y)
    trainer = SparkTrainer(
        two_headed(named=backend == "hogwild"),
        backend=backend,
        num_workers=2,
        epochs=3,
        spark=spark,
        seed=0,
        verbose=0,
    )
    result = trainer.fit(
        train,
        features=["image", "meta"],
        label=["digit", "parity"],
        sample_weight="weight",
        validation_data=validation,
    )
    # Unweighted, two thirds of the digits are wrong: only the weights make these floors reachable.
    assert result.history["val_digit_accuracy"][-1] > FLOOR
    inputs = {"image": clean_x[0], "meta": clean_x[1]} if backend == "hogwild" else clean_x
    # Spark's evaluate: the next test
    scores = result.model.evaluate(inputs, clean_y, return_dict=True, verbose=0)
    assert scores["digit_accuracy"] > FLOOR and scores["parity_accuracy"] > FLOOR


@pytest.mark.spark
def test_numpy_lists_train_a_two_headed_model_and_wrong_columns_are_refused(spark):
    image, meta, digit, parity, weight, (clean_x, clean_y) = noisy_two_headed_rows(400)
    trainer = SparkTrainer(
        two_headed(),
        backend="sync",
        num_workers=2,
        epochs=3,
        spark=spark,
        seed=0,
        verbose=0,
        data=DataConfig(partition_storage="stream"),
    )
    result = trainer.fit(
        [image, meta], [digit, parity], sample_weight=weight, validation_data=(clean_x, clean_y)
    )
    assert result.stats["partition_storage"]["path"] == "stream"
    assert result.history["val_parity_accuracy"][-1] > FLOOR
    scores = trainer.evaluate(clean_x, clean_y)
    assert scores["digit_accuracy"] > FLOOR and scores["parity_accuracy"] > FLOOR
    assert set(scores) >= {"loss", "digit_loss", "parity_loss"}
    predicted = trainer.predict(clean_x).select("prediction_digit").collect()
    digits = np.array([row["prediction_digit"] for row in predicted]).argmax(axis=1)
    assert (digits == clean_y[0]).mean() > FLOOR

    train = dataframe_of(spark, image, meta, digit, parity, weight)
    rows = (
        trainer.predict(train, features=["image", "meta"])
        .select("digit", "prediction_digit", "prediction_parity")
        .collect()
    )
    assert (
        len(rows) == 1200
        and len(rows[0]["prediction_digit"]) == 4
        and len(rows[0]["prediction_parity"]) == 1
    )
    with pytest.raises(
        DataError, match=r"pass `features=` as a list of 2 .* Received: features='image'"
    ):
        trainer.fit(train, features="image", label=["digit", "parity"])
    with pytest.raises(DataError, match=r"input 'image' must have 16 values .* column 'meta'"):
        trainer.fit(train, features=["meta", "image"], label=["digit", "parity"])
    with pytest.raises(DataError, match=r"outside the model's classes"):
        trainer.fit(
            dataframe_of(spark, image, meta, digit + 1, parity),
            features=["image", "meta"],
            label=["digit", "parity"],
        )
    with pytest.raises(
        ConfigurationError, match="Elephas trains models with one input and one output"
    ):
        SparkTrainer(two_headed(), backend="elephas", spark=spark, verbose=0).fit(
            [image, meta], [digit, parity]
        )
    with pytest.raises(ConfigurationError, match="`class_weight` is for models with one output"):
        trainer.fit([image, meta], [digit, parity], class_weight={0: 2.0})
