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

    def apply(self, center: np.ndarray, update: np.ndarray, staleness: int, window: int) -> tuple[np.ndarray, np.ndarray]:
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

    def apply_in_place(self, center: np.ndarray, update: np.ndarray, staleness: int, window: int) -> np.ndarray:
        """Apply one push by writing into ``center`` (lock-free engines); returns the reply.

        The default goes through :meth:`apply` and copies the result back.
        """
        new_center, reply = self.apply(center, update, staleness, window)
        center[...] = new_center
        return reply if reply is not new_center else center
