"""The contract for update rules: how a pushed update changes the center weights.

Rules are small pure objects; the asynchronous engines define the concrete ones (DOWNPOUR, ADAG,
DynSGD, elastic averaging). The store calls :meth:`UpdateRule.apply` under its lock, or without
it for hogwild, and never hands a rule an update that failed validation.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np


class UpdateRule:
    """Turns a worker's push into a new center and the reply the worker adopts.

    Attributes:
        name: the rule's name as users spell it in ``backend_options``.
        payload: what workers push: ``"delta"`` (their change since the pull) or ``"weights"``
            (their current weights, for rules such as elastic averaging).
    """

    name: ClassVar[str] = "rule"
    payload: ClassVar[str] = "delta"

    def apply(
        self, center: np.ndarray, update: np.ndarray, staleness: int, window: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Apply one push.

        Args:
            center: the current center weights (flat float32). Treat as read-only unless
                :meth:`apply_in_place` is being used.
            update: the pushed delta or weights (flat float32, already validated finite).
            staleness: center updates applied since this worker's last pull.
            window: local steps the worker trained since its last pull.

        Returns:
            ``(new_center, reply)``: the center after the update (a new array) and the weights the
            worker continues from.
        """
        raise NotImplementedError

    def apply_in_place(
        self, center: np.ndarray, update: np.ndarray, staleness: int, window: int
    ) -> np.ndarray:
        """Apply one push by writing into ``center`` (lock-free engines); returns the reply.

        The default goes through :meth:`apply` and copies the result back.
        """
        new_center, reply = self.apply(center, update, staleness, window)
        center[...] = new_center
        return reply if reply is not new_center else center

    def scale(self, staleness: int, window: int) -> float | None:
        """The factor ``f`` when the rule is ``center += f * delta``, element by element, so a
        sparse push can be applied at its positions alone; ``None`` (the default) for any other
        rule, whose sparse pushes are expanded to whole arrays first."""
        return None


class Downpour(UpdateRule):
    """DOWNPOUR (Dean et al., "Large Scale Distributed Deep Networks", NIPS 2012): center +=
    delta."""

    name = "downpour"

    def apply(
        self, center: np.ndarray, update: np.ndarray, staleness: int, window: int
    ) -> tuple[np.ndarray, np.ndarray]:
        new_center = center + update
        return new_center, new_center

    def apply_in_place(
        self, center: np.ndarray, update: np.ndarray, staleness: int, window: int
    ) -> np.ndarray:
        center += update
        return center

    def scale(self, staleness: int, window: int) -> float:
        return 1.0


class _Scaled(UpdateRule):
    """center += delta * scale(staleness, window), with one temporary."""

    def scale(self, staleness: int, window: int) -> float:
        raise NotImplementedError

    def apply(
        self, center: np.ndarray, update: np.ndarray, staleness: int, window: int
    ) -> tuple[np.ndarray, np.ndarray]:
        new_center = update * np.float32(self.scale(staleness, window))
        new_center += center
        return new_center, new_center

    def apply_in_place(
        self, center: np.ndarray, update: np.ndarray, staleness: int, window: int
    ) -> np.ndarray:
        center += update * np.float32(self.scale(staleness, window))
        return center


class Adag(_Scaled):
    """ADAG (Hermans, "Gradient Energy Matching" / Dist-Keras, 2017): center += delta / window.

    Normalising the accumulated change by the communication window keeps the center's step
    independent of how many local steps a worker took between exchanges.
    """

    name = "adag"

    def scale(self, staleness: int, window: int) -> float:
        return 1.0 / max(window, 1)


class DynSGD(_Scaled):
    """DynSGD (Jiang et al., "Heterogeneity-aware Distributed Parameter Servers", SIGMOD 2017).

    center += delta / max(staleness + 1, floor), where staleness is the number of center updates
    applied since the pushing worker last pulled: stale changes count for less.

    Args:
        floor: the least a push is divided by (default 1: the paper's rule). The asynchronous
            engines set it to the factor they multiply the workers' learning rate by
            (``lr_scale``): with ``n`` workers at ``n`` times the rate, a push that met no other
            update (staleness 0: every worker's first push, or a worker the machine ran twice in
            a row) would otherwise move the center ``n`` times as far as the user's rate allows.
            Those jumps gave the fat tail of early asynchronous runs (single epochs ending at
            0.953-0.979 test accuracy on MNIST where most end near 0.985); with the floor they did
            not.

    Example:
        >>> DynSGD(floor=4).scale(staleness=1, window=20)
        0.25
    """

    name = "dynsgd"

    def __init__(self, floor: float = 1.0) -> None:
        if not floor >= 1:
            raise ValueError(
                f"Expected `floor` >= 1 (the least a push is divided by). Received: "
                f"floor={floor!r}."
            )
        self.floor = float(floor)

    def scale(self, staleness: int, window: int) -> float:
        return 1.0 / max(max(staleness, 0) + 1, self.floor)


class StalenessAware(_Scaled):
    """Staleness-aware async SGD (Zhang, Gupta, Lian, Liu, "Staleness-aware Async-SGD for
    Distributed Deep Learning", IJCAI 2016): center += delta / max(staleness, 1).

    The step shrinks in proportion to the updates that landed since the worker pulled, but a push
    with one update in between (the usual case with two workers) counts in full, where DynSGD
    halves it: with ``n`` workers the typical staleness is ``n - 1``, so the center moves about as
    far per sample as one process would.
    """

    name = "sasgd"

    def scale(self, staleness: int, window: int) -> float:
        return 1.0 / max(staleness, 1)


class ElasticAveraging(UpdateRule):
    """Asynchronous elastic averaging (Zhang, Choromanska, LeCun, "Deep learning with Elastic
    Averaging SGD", NIPS 2015).

    Workers push their weights ``w``; with ``e = alpha * (w - center)`` the center moves toward
    the worker (``center += e``) and the worker toward the center (``w -= e``, the reply).
    """

    name = "easgd"
    payload = "weights"

    def __init__(self, alpha: float = 0.5) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"Expected 0 < alpha <= 1. Received: alpha={alpha!r}.")
        self.alpha = alpha

    def apply(
        self, center: np.ndarray, update: np.ndarray, staleness: int, window: int
    ) -> tuple[np.ndarray, np.ndarray]:
        elastic = update - center
        elastic *= np.float32(self.alpha)
        return center + elastic, update - elastic

    def apply_in_place(
        self, center: np.ndarray, update: np.ndarray, staleness: int, window: int
    ) -> np.ndarray:
        elastic = update - center
        elastic *= np.float32(self.alpha)
        center += elastic
        return update - elastic


class OuterNesterov:
    """An outer optimizer for round barriers: Nesterov momentum on the round's averaged change.

    Local SGD averages the workers' weights every round; DiLoCo (Douillard et al., "DiLoCo:
    Distributed Low-Communication Training of Language Models", 2023) treats the difference
    between the last center and the new average as a gradient, ``g = center - average``, and
    steps the center with Nesterov momentum: ``m = momentum * m + g`` then
    ``center -= lr * (g + momentum * m)``. Block momentum (Chen & Huo, "Scalable training of deep
    learning machines by incremental block training with intra-block parallel optimization and
    blockwise model-update filtering", ICASSP 2016) is the same filter without the look-ahead.
    ``lr=1, momentum=0`` is plain averaging. The momentum is the server's alone (the workers keep
    their own optimizers' state across rounds) and starts from zero when a stage restarts.
    """

    def __init__(self, lr: float = 1.0, momentum: float = 0.0, nesterov: bool = True) -> None:
        if not lr > 0:
            raise ValueError(f"Expected outer_lr > 0. Received: outer_lr={lr!r}.")
        if not 0 <= momentum < 1:
            raise ValueError(
                f"Expected 0 <= outer_momentum < 1. Received: outer_momentum={momentum!r}."
            )
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.velocity: np.ndarray | None = None

    def step(self, center: np.ndarray, average: np.ndarray) -> np.ndarray:
        """The new center from the last one and the round's average; the average itself when the
        step would leave float32's range (the average is finite: the store checked it)."""
        if self.lr == 1.0 and self.momentum == 0.0:
            return average
        with np.errstate(over="ignore", invalid="ignore"):
            gradient = center - average
            if self.momentum:
                if self.velocity is None:
                    self.velocity = np.zeros_like(center)
                self.velocity *= np.float32(self.momentum)
                self.velocity += gradient
                if self.nesterov:
                    gradient += self.velocity * np.float32(self.momentum)
                else:
                    gradient[...] = self.velocity
            gradient *= np.float32(-self.lr)
            gradient += center
        return gradient if np.isfinite(gradient).all() else average


RULES: dict[str, type[UpdateRule]] = {
    r.name: r for r in (Downpour, Adag, DynSGD, StalenessAware, ElasticAveraging)
}
"""The update rules by name, as ``backend_options={"rule": ...}`` takes them."""


def make_rule(name: str, **params: float) -> UpdateRule:
    """An update rule by name (``downpour``, ``adag``, ``dynsgd``, ``sasgd``, ``easgd``).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in RULES:
        raise ValueError(f"Unknown update rule {name!r}. Known rules: {sorted(RULES)}.")
    return RULES[name](**params)
