"""Data validation on arrays, without Spark: what each check refuses, and what it lets through."""

import numpy as np
import pytest

from kerasonspark import DataError
from kerasonspark._data import (
    DataInfo,
    as_features,
    block_problems,
    check_label_shape,
    raise_problems,
    validate_arrays,
)

SPARSE = DataInfo((2, 2), "sparse", 3)
ONE_HOT = DataInfo((4,), "one_hot", 3)
RAW = DataInfo((4,), "raw", None, (2,))
GIVEN = DataInfo((4,), "given", None)


def test_features_are_reshaped_to_the_input_and_cast():
    x = as_features(np.arange(8, dtype=np.int64).reshape(2, 4), SPARSE, "the features")
    assert x.shape == (2, 2, 2) and x.dtype == np.float32
    with pytest.raises(
        DataError, match="4 values to fit the model's input shape \\(2, 2\\).*\\(2, 3\\)"
    ):
        as_features(np.zeros((2, 3)), SPARSE, "the features")
    with pytest.raises(DataError, match="The features hold no samples"):
        as_features(np.zeros((0, 4)), SPARSE, "the features")
    with pytest.raises(DataError, match="^The features must be numeric. Received: dtype=<U1.$"):
        as_features(np.array([["a"] * 4]), SPARSE, "the features")
    assert as_features(np.ones((1, 2, 2)), SPARSE, "x").shape == (1, 2, 2)  # one sample
    # one value a sample
    assert as_features(np.arange(5), DataInfo((1,), "raw", None, (1,)), "x").shape == (
        5,
        1,
    )
    with pytest.raises(DataError, match="4 values"):
        as_features(np.float32(1.0), SPARSE, "the features")


def test_block_problems_count_each_reason():
    x = np.zeros((5, 4), np.float32)
    x[1, 2] = np.nan
    y = np.array([0, 1, 2, 3, 1.5])
    assert block_problems(x, y, ONE_HOT) == {
        "nonfinite_rows": 1,
        "label_out_of_range": 1,
        "label_not_integer": 1,
        "bad_weights": 0,
    }
    assert block_problems(x[:0], y[:0], ONE_HOT) == {
        "nonfinite_rows": 0,
        "label_out_of_range": 0,
        "label_not_integer": 0,
        "bad_weights": 0,
    }
    weights = np.array([1.0, 0.0, -0.5, np.nan, np.inf], np.float32)
    # zero is a weight; negative, NaN, Inf are not
    assert block_problems(x, y, ONE_HOT, weights)["bad_weights"] == 3
    y_bad = np.array([0.0, np.inf, -1, 2, 2])
    assert block_problems(np.zeros((5, 4), np.float32), y_bad, SPARSE) == {
        "nonfinite_rows": 1,
        "label_out_of_range": 1,
        "label_not_integer": 0,
        "bad_weights": 0,
    }
    # Targets and a loss of the user's own are not class indices: only non-finite values count.
    assert block_problems(x, np.array([9.5, -3, 0, 1, 2]), RAW)["label_out_of_range"] == 0
    assert block_problems(x, np.array([9, -3, 0, 1, 2]), GIVEN) == {
        "nonfinite_rows": 1,
        "label_out_of_range": 0,
        "label_not_integer": 0,
        "bad_weights": 0,
    }


def test_raise_problems_message_in_full():
    with pytest.raises(DataError) as refused:
        raise_problems(
            [{"nonfinite_rows": 1, "label_out_of_range": 2, "label_not_integer": 3}], "validation"
        )
    assert str(refused.value) == (
        "The validation data cannot be trained on as given: 1 row(s) with NaN, Inf or null "
        "features or labels (1 in partition 0); drop or impute them; 2 label(s) outside the "
        "model's classes (2 in partition 0); map labels to 0..num_classes-1 or widen the output "
        "layer; 3 non-integer class label(s) (3 in partition 0); labels must be whole class "
        "indices."
    )
    with pytest.raises(DataError) as many:
        raise_problems([{"nonfinite_rows": 1}] * 10, "training")
    assert (
        "10 row(s)" in str(many.value)
        and "1 in partition 7);" in str(many.value)
        and "partition 8" not in str(many.value)
    )


def test_raise_problems_names_every_reason_and_partition():
    raise_problems([{"nonfinite_rows": 0}], "training")  # nothing wrong, nothing raised
    with pytest.raises(DataError) as refused:
        raise_problems(
            [{"nonfinite_rows": 2}, {"nonfinite_rows": 1, "label_out_of_range": 4}], "training"
        )
    text = str(refused.value)
    assert "3 row(s) with NaN" in text and "2 in partition 0, 1 in partition 1" in text
    assert (
        "4 label(s) outside the model's classes (4 in partition 1)" in text
        and "The training data" in text
    )


def test_label_shapes_are_checked_against_the_output():
    check_label_shape((10,), SPARSE, "y")
    check_label_shape((10, 3), ONE_HOT, "y")
    with pytest.raises(DataError, match="one-hot vectors of width 3.*\\(10, 4\\)"):
        check_label_shape((10, 4), ONE_HOT, "y")
    check_label_shape((10, 2), RAW, "y")
    check_label_shape((10, 1, 2), RAW, "y")
    with pytest.raises(DataError, match="2 value\\(s\\) each"):
        check_label_shape((10, 3), RAW, "y")
    check_label_shape((10, 7), GIVEN, "y")  # as the user gave them


def test_validate_arrays_refuses_before_any_work():
    x, y = np.zeros((6, 4), np.float32), np.array([0, 1, 2, 0, 1, 2])
    vx, vy, vw = validate_arrays((x, y), ONE_HOT, "training")
    assert vx.shape == (6, 4) and np.array_equal(vy, y) and vw is None
    weights = validate_arrays((x, y, np.arange(6)), ONE_HOT, "training")[2]
    assert weights.dtype == np.float32 and np.array_equal(weights, np.arange(6))
    # a column of labels
    assert validate_arrays((x, y[:, None]), ONE_HOT, "training")[1].shape == (6,)
    with pytest.raises(
        DataError,
        match="a pair `\\(x, y\\)` or a triple `\\(x, y, sample_weight\\)`. Received: a tuple of 4",
    ):
        validate_arrays((x, y, y, y), ONE_HOT, "training")
    with pytest.raises(
        DataError, match="one number per row, shape \\(6,\\). Received: shape \\(6, 2\\)"
    ):
        validate_arrays((x, y, np.ones((6, 2))), ONE_HOT, "training")
    with pytest.raises(
        DataError, match="1 sample weight\\(s\\) that are negative, NaN, Inf or null"
    ):
        validate_arrays((x, y, np.array([1, 1, 1, -1, 1, 1])), ONE_HOT, "training")
    with pytest.raises(DataError, match="differ in length: 6 vs 5"):
        validate_arrays((x, y[:5]), ONE_HOT, "training")
    with pytest.raises(DataError, match="Labels in the validation labels must be numeric"):
        validate_arrays((x, np.array(list("abcdef"))), ONE_HOT, "validation")
    with pytest.raises(
        DataError, match="^The training data cannot be trained on as given: 2 label\\(s\\) outside"
    ):
        validate_arrays((x, y + 1), ONE_HOT, "training")
    with pytest.raises(DataError, match="^Each sample in the training features must have 4 values"):
        validate_arrays((x[:, :3], y), ONE_HOT, "training")
    with pytest.raises(
        DataError, match="^Labels in the training data should be class indices or one-hot"
    ):
        validate_arrays((x, np.zeros((6, 5))), ONE_HOT, "training")
    one_hot = np.eye(3)[y]
    # kept whole
    assert np.array_equal(validate_arrays((x, one_hot), ONE_HOT, "training")[1], one_hot)


def test_labels_are_converted_to_what_the_loss_takes():
    indices = np.array([2, 0])
    assert SPARSE.model_labels(indices).dtype == np.int32
    assert np.array_equal(SPARSE.model_labels(np.eye(3)[indices]), indices)
    assert np.array_equal(ONE_HOT.model_labels(indices), np.eye(3, dtype=np.float32)[indices])
    assert (
        ONE_HOT.model_labels(indices).dtype
        == ONE_HOT.model_labels(np.eye(3)[indices]).dtype
        == np.float32
    )
    assert RAW.model_labels(np.zeros((3, 1, 2))).shape == (3, 2)
    assert RAW.model_labels(np.zeros((3, 2), np.float64)).dtype == np.float32
    given = GIVEN.with_given_labels(0, integer=True)
    assert given.model_labels(indices).dtype == np.int32 and given.label_shape == ()
    assert GIVEN.with_given_labels(3, integer=False).label_shape == (3,)
    assert GIVEN.with_given_labels(3, integer=False).label_dtype == "float32"
    assert GIVEN.with_given_labels(0, integer=False).model_labels(indices).dtype == np.float32
    # only a loss of the user's own reads them
    assert SPARSE.with_given_labels(3, integer=False) is SPARSE


def test_the_label_convention_is_read_off_the_loss():
    import keras

    from conftest import small_model

    model = small_model()  # 16 inputs, 4 classes
    assert DataInfo.for_model(model, {"loss": "sparse_categorical_crossentropy"}) == DataInfo(
        (16,), "sparse", 4
    )
    assert DataInfo.for_model(model, {"loss": "categorical_crossentropy"}) == DataInfo(
        (16,), "one_hot", 4
    )
    assert DataInfo.for_model(model, {"loss": "mse"}) == DataInfo((16,), "raw", None, (4,))
    keras_class = keras.saving.serialize_keras_object(keras.losses.MeanSquaredError())
    assert DataInfo.for_model(model, {"loss": keras_class}) == DataInfo((16,), "raw", None, (4,))
    mine = {
        "module": "builtins",
        "class_name": "function",
        "config": "me>loss",
        "registered_name": "function",
    }
    assert DataInfo.for_model(model, {"loss": mine}) == DataInfo((16,), "given", None)
    images = keras.Sequential([keras.Input((5, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    assert DataInfo.for_model(images, {"loss": "sparse_categorical_crossentropy"}) == DataInfo(
        (5, 3), "sparse", 2
    )
    # output (None, 5, 2): classes last
    per_step = keras.Sequential([keras.Input((5, 3)), keras.layers.Dense(2)])
    assert DataInfo.for_model(per_step, {"loss": "categorical_crossentropy"}) == DataInfo(
        (5, 3), "one_hot", 2
    )


def test_models_the_data_path_cannot_feed_are_named_and_several_inputs_and_outputs_are_read():
    import keras

    a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    two_inputs = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
    info = DataInfo.for_model(two_inputs, {"loss": "mse"})
    assert (
        info.inputs == (("a", (2,)), ("b", (3,)))
        and info.input_shape == (5,)
        and info.label_mode == "raw"
    )
    ragged = keras.Sequential([keras.Input((None, 3)), keras.layers.Dense(2)])
    with pytest.raises(
        DataError,
        match="^The model's input shapes must be fully known except the batch. Received: "
        "input shape \\(None, None, 3\\)",
    ):
        DataInfo.for_model(ragged, {"loss": "mse"})
    x = keras.Input((4,))
    two_outputs = keras.Model(
        x, [keras.layers.Dense(1, name="one")(x), keras.layers.Dense(2, name="two")(x)]
    )
    info = DataInfo.for_model(two_outputs, {"loss": ["mse", "categorical_crossentropy"]})
    assert info.label_mode == "packed" and info.label_shape == (3,)
    assert [(name, one.label_mode) for name, one in info.outputs] == [
        ("one", "raw"),
        ("two", "one_hot"),
    ]
