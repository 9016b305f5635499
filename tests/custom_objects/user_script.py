"""What a user's script defines: a layer, a loss and a metric, registered with Keras and never
listed in `custom_objects`. tests/test_custom_objects.py runs this file's code in the test
process's own `__main__`, as `python user_script.py` would, so the objects live in `__main__`."""

import keras


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
    picked = keras.ops.take_along_axis(
        y_pred, keras.ops.cast(keras.ops.reshape(y_true, (-1, 1)), "int32"), axis=1
    )
    return -keras.ops.log(keras.ops.clip(picked[:, 0], 1e-7, 1.0))


@keras.saving.register_keras_serializable(package="script")
def top_probability(y_true, y_pred):
    return keras.ops.mean(keras.ops.max(y_pred, axis=-1))
