import keras
import numpy as np

from kerasonspark._serialization import ModelSpec, get_flat_weights, set_flat_weights


@keras.saving.register_keras_serializable(package="kos_tests")
class Scale(keras.layers.Layer):
    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def test_spec_round_trips_architecture_compile_config_and_weights():
    model = keras.Sequential([keras.Input((3,)), Scale(3.0), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.05), "mse", metrics=["mae"])
    spec = ModelSpec.from_model(model, {"Scale": Scale})
    rebuilt = ModelSpec.from_bytes(spec.to_bytes(), {"Scale": Scale}).build()
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    np.testing.assert_allclose(
        rebuilt.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )
    assert isinstance(rebuilt.optimizer, keras.optimizers.SGD)
    assert abs(float(rebuilt.optimizer.learning_rate) - 0.05) < 1e-7
    assert rebuilt.layers[0].factor == 3.0
    assert b"pickle" not in spec.to_bytes()[:64]


def test_flat_weights_round_trip():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    flat = get_flat_weights(model)
    assert flat.dtype == np.float32 and flat.size == 3 * 2 + 2
    set_flat_weights(model, np.arange(8, dtype=np.float32))
    np.testing.assert_array_equal(model.get_weights()[1], [6, 7])
