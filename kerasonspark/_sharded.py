"""What an engine's exchange does through a sharded center, whatever it exchanges (rounds or
pushes): open the worker's shard at the start, read and announce stops, report failures to every
shard, close it, and add the shard's figures to the worker's. See
:mod:`kerasonspark.parameter_server._shards` for the center itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .engine import ServerExchange
from .parameter_server._shards import ShardedCenter

if TYPE_CHECKING:
    from .parameter_server._rules import OuterNesterov, UpdateRule


class ShardedServerExchange(ServerExchange):
    """A :class:`~kerasonspark.engine.ServerExchange` whose center is sharded over the workers.

    Mixed in before an engine's exchange (``class Sharded(ShardedServerExchange, SyncExchange)``),
    it keeps the driver's connection for the control path and the mirror; the subclass opens the
    center in ``start`` with :meth:`open_center` and exchanges through :attr:`center`.

    Args (set with :meth:`shard_over`):
        num_workers: the workers sharing the center (read when each stage starts).
        barrier_timeout: seconds a round or an epoch's fence waits for the missing workers.
    """

    num_workers = 0
    barrier_timeout = 300.0
    _center: ShardedCenter | None = None

    def shard_over(self, num_workers: int, barrier_timeout: float) -> None:
        """Share the center among ``num_workers`` workers."""
        self.num_workers, self.barrier_timeout = num_workers, barrier_timeout

    def open_center(
        self,
        center: np.ndarray,
        rule: UpdateRule | None = None,
        lock: bool = True,
        outer: OuterNesterov | None = None,
        state: list[tuple[int, int]] | None = None,
    ) -> None:
        """Serve this worker's shard of ``center`` and meet every peer's (after ``start``);
        ``state``: the layer state's element ranges (see ``ParameterStore``)."""
        self._center = ShardedCenter(
            self.client,
            self.secret,
            self.worker,
            self.num_workers,
            center,
            barrier_timeout=self.barrier_timeout,
            timeout=self.timeout,
            timeout_name=f"backend_options['{self.timeout_name}']",
            rule=rule,
            lock=lock,
            outer=outer,
            state=state or [],
        )

    @property
    def center(self) -> ShardedCenter:
        """The worker's shard server and its lines to the peers (after :meth:`open_center`)."""
        if self._center is None:
            raise RuntimeError("The exchange used its sharded center before opening it.")
        return self._center

    def should_stop(self) -> bool:
        return self._center is not None and self._center.stop_requested

    def announce_stop(self) -> None:
        if self._center is not None:
            self._center.announce_stop()

    def sharded_figures(self, figures: dict[str, Any], seconds: float) -> dict[str, Any]:
        """The worker's ``figures`` with the links' traffic: ``mb_sent`` / ``mb_received`` over
        every link, the driver's and the peers' apart, and ``exchange_seconds`` set to
        ``seconds``."""
        shard = self.center.figures()
        return {
            **figures,
            "exchange_seconds": seconds,
            "mb_sent": figures["mb_sent"] + shard["peer_mb_sent"],
            "mb_received": figures["mb_received"] + shard["peer_mb_received"],
            "driver_mb_sent": figures["mb_sent"],
            "driver_mb_received": figures["mb_received"],
            **shard,
        }

    def report_failure(self, message: str) -> None:
        super().report_failure(message)
        if self._center is not None:
            self._center.report_failure(message)

    def close(self) -> None:
        if self._center is not None:
            self._center.close()
        super().close()
