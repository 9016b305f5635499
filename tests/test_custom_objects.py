"""Custom Keras objects reach the executors by themselves, from the user's script (`__main__`) and
from a helper module the executors lack, for training, evaluate and predict, with every engine."""

import importlib
import importlib.util

import numpy as np
import pytest

from kerasonspark import SparkTrainer

from conftest import make_blobs

pytestmark = pytest.mark.spark


def build_model(main, helper):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    hidden = keras.layers.Dense(32, activation="relu")(helper.Offset()(main.Scale()(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(hidden))
    model.compile(
        keras.optimizers.Adam(0.01),
        main.sparse_loss,
        metrics=[main.top_probability, helper.mean_confidence, "accuracy"],
    )
    return model


def test_script_defined_layer_loss_and_metric_train_on_every_engine(spark, user_code):
    main, helper = user_code
    assert main.Scale.__module__ == "__main__" and helper.Offset.__module__ == "custom_parts"
    lacking = (
        spark.sparkContext.parallelize([0, 1], 2)
        .map(lambda _: importlib.util.find_spec("custom_parts") is None)
        .collect()
    )
    assert lacking == [True, True]  # the executors cannot import the helper module
    x, y = make_blobs(600)
    # One engine per way the model reaches where it trains: the shared worker loop (`sync`; `async`
    # and
    # `hogwild` build it the same way), the driver (`single`) and Elephas's own workers (`elephas`).
    for backend in ("elephas", "single", "sync"):
        model = build_model(main, helper)
        trainer = SparkTrainer(
            model,
            backend=backend,
            num_workers=2,
            epochs=2,
            batch_size=16,
            spark=spark,
            seed=0,
            verbose=0,
        )
        result = trainer.fit(x, y, validation_data=(x[:200], y[:200]))
        assert {
            "top_probability",
            "mean_confidence",
            "val_top_probability",
            "val_mean_confidence",
        } <= set(result.history)
        assert result.history["val_accuracy"][-1] > 0.9, (backend, result.history)
    # evaluate and predict rebuild the model on the executors the same way whatever trained it
    scores = trainer.evaluate(x, y)
    assert (
        scores["accuracy"] > 0.9
        and 0.5 < scores["top_probability"] <= 1.0
        and "mean_confidence" in scores
    )
    predicted = np.array([r.prediction for r in trainer.predict(x[:20]).collect()])
    np.testing.assert_allclose(predicted, model.predict(x[:20], verbose=0), atol=1e-5)
    trainer.close()
