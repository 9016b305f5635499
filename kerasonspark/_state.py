"""Model state that is not a gradient: the moving statistics layers update themselves.

``BatchNormalization`` keeps a moving mean and variance, exponential moving averages with
momentum ``m`` that each training step moves toward its batch's statistics:
``v <- m v + (1 - m) b``. Averaging N workers' copies after each ran ``k`` steps from the
center's ``v0`` gives ``m^k v0 + (1 - m^k) mean(b)``: the statistics of ``k`` steps, although
the run took ``N k``. With Keras's default momentum (0.99) the center's statistics then lag N
times behind what one process would hold after the same batches, and a short run predicts with
statistics still near their initial 0 and 1 (one class for every input; training-mode accuracy,
which uses the batch's own statistics, looks fine).

:class:`MovingStatistics` advances them as if one process had taken every worker's steps: each
worker scales its change by ``(1 - m^(N k)) / (1 - m^k)`` before the average, so the average is
``m^(N k) v0 + (1 - m^(N k)) mean(b)``, exact when the batches' statistics agree and never past
them.

The asynchronous engines need no such scaling (each push adds one worker's steps to the center,
as one process would take them in turn), only that the statistics bypass the update rule:
:func:`state_ranges` names every non-trainable weight, and the parameter store adds their pushed
change as it is, never divided by staleness or window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras


def _weight_ranges(model: keras.Model) -> dict[int, tuple[int, int]]:
    """Each of ``model.weights``' element range in the flat weights, by the variable's id."""
    ranges, start = {}, 0
    for variable in model.weights:
        size = int(np.prod(variable.shape))
        ranges[id(variable)] = (start, start + size)
        start += size
    return ranges


def state_ranges(model: keras.Model) -> list[tuple[int, int]]:
    """The element ranges of ``model``'s non-trainable weights in its flat weights: state a layer
    updates itself (moving statistics) or weights no optimizer moves (a frozen layer's)."""
    ranges = _weight_ranges(model)
    return sorted(ranges[id(v)] for v in model.non_trainable_weights if id(v) in ranges)


class MovingStatistics:
    """The moving averages of ``model``'s layers, as slices of its flat weights.

    Args:
        model: a built Keras model; its ``BatchNormalization`` layers (at any depth) are found
            with their momentum.
    """

    def __init__(self, model: keras.Model) -> None:
        import keras

        offsets = _weight_ranges(model)
        self.slices: list[tuple[int, int, float]] = []
        for layer in model._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, keras.layers.BatchNormalization):
                for variable in (layer.moving_mean, layer.moving_variance):
                    if id(variable) in offsets:
                        self.slices.append((*offsets[id(variable)], float(layer.momentum)))

    def __bool__(self) -> bool:
        return bool(self.slices)

    def advance(
        self, weights: np.ndarray, start: np.ndarray, steps: int, workers: int
    ) -> np.ndarray:
        """Scale, in place, each moving average's change since ``start`` so that the average of
        ``workers`` workers' weights (each after ``steps`` steps) holds the statistics of all
        their steps. Returns ``weights``."""
        if workers <= 1 or steps <= 0:
            return weights
        for a, b, momentum in self.slices:
            if not 0.0 < momentum < 1.0:
                continue
            scale = (1.0 - momentum ** (workers * steps)) / (1.0 - momentum**steps)
            weights[a:b] = start[a:b] + np.float32(scale) * (weights[a:b] - start[a:b])
        return weights
