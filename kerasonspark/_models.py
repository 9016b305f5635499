"""Reference models."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

MNIST_CNN_PARAMETERS = 1_048_853


def mnist_cnn(
    compile: bool = True, learning_rate: float = 1e-3, seed: int | None = None
) -> keras.Model:
    """The MNIST CNN of the 2017 Dist-Keras run, layer for layer.

    Conv2D(32, 3) + ReLU, Conv2D(32, 3) + ReLU, MaxPooling2D(2), Flatten, Dense(225) + ReLU,
    Dense(10) + softmax: 1,048,853 parameters, input ``(28, 28, 1)`` floats in [0, 1].

    Args:
        compile: compile with Adam, sparse categorical cross-entropy and accuracy.
        learning_rate: Adam's learning rate when ``compile`` is true.
        seed: seeds the weight initialisers, so two calls give the same initial weights.

    Returns:
        A ``keras.Sequential`` model.

    Example:
        >>> model = mnist_cnn()
        >>> model.count_params()
        1048853
    """
    import keras

    def init(i: int) -> keras.initializers.Initializer:
        return keras.initializers.GlorotUniform(seed=None if seed is None else seed + i)

    model = keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu", kernel_initializer=init(0)),
            keras.layers.Conv2D(32, 3, activation="relu", kernel_initializer=init(1)),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(225, activation="relu", kernel_initializer=init(2)),
            keras.layers.Dense(10, activation="softmax", kernel_initializer=init(3)),
        ],
        name="mnist_cnn",
    )
    if compile:
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    return model
