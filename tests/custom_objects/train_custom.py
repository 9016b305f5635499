"""A user's script: custom layer, loss and metric defined here (in __main__) and in a helper module
beside it, registered with Keras and never listed in `custom_objects`. Trains with every engine on
local[2] and prints what happened as JSON (for tests/test_custom_objects.py)."""

import importlib.util
import json
import sys

import keras
import numpy as np

from custom_parts import Offset, mean_confidence


@keras.saving.register_keras_serializable(package="script")
class Scale(keras.layers.Layer):
    """Multiplies every feature by a learned factor."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.scale


@keras.saving.register_keras_serializable(package="script")
def sparse_loss(y_true, y_pred):
    """Cross-entropy on class indices, written by hand: the labels arrive as the user gave them."""
    picked = keras.ops.take_along_axis(y_pred, keras.ops.cast(keras.ops.reshape(y_true, (-1, 1)), "int32"), axis=1)
    return -keras.ops.log(keras.ops.clip(picked[:, 0], 1e-7, 1.0))


@keras.saving.register_keras_serializable(package="script")
def top_probability(y_true, y_pred):
    return keras.ops.mean(keras.ops.max(y_pred, axis=-1))


def model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16,))
    hidden = keras.layers.Dense(32, activation="relu")(Offset()(Scale()(inputs)))
    outputs = keras.layers.Dense(4, activation="softmax")(hidden)
    built = keras.Model(inputs, outputs)
    built.compile(keras.optimizers.Adam(0.01), sparse_loss, metrics=[top_probability, mean_confidence, "accuracy"])
    return built


def main():
    from kerasonspark import SparkTrainer, available_backends
    from kerasonspark.session import start_session

    rng = np.random.default_rng(0)
    centers = rng.normal(scale=3.0, size=(4, 16))
    y = rng.integers(0, 4, size=800)
    x = (centers[y] + rng.normal(size=(800, 16))).astype(np.float32)
    spark = start_session("local[2]", "kerasonspark-custom-objects")
    spark.sparkContext.setLogLevel("ERROR")
    report = {"executors_lack_helper": spark.sparkContext.parallelize([0], 1).map(
        lambda _: importlib.util.find_spec("custom_parts") is None).collect() == [True]}
    for backend in sorted(available_backends()):
        trained = model()
        trainer = SparkTrainer(trained, backend=backend, num_workers=2, epochs=2, batch_size=16, spark=spark,
                               seed=0, verbose=0)
        result = trainer.fit(x, y, validation_data=(x[:200], y[:200]))
        report[backend] = {"history": sorted(result.history), "val_accuracy": result.history["val_accuracy"][-1]}
    # evaluate and predict rebuild the model on the executors the same way whatever trained it
    predicted = np.array([r.prediction for r in trainer.predict(x[:20]).collect()])
    report["evaluate"] = trainer.evaluate(x, y)
    report["predict_matches"] = bool(np.allclose(predicted, trained.predict(x[:20], verbose=0), atol=1e-5))
    trainer.close()
    spark.stop()
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
