"""A sharded center: each worker serves one shard of the center, so no round crosses the driver.

Worker ``j`` of ``n`` owns elements ``shard_bounds(size, n)[j]`` of the flat weights. It serves them
from its own task with the same parameter server as the driver's (the same wire format, the
stage's secret, a payload cap of the shard's size), on the address it reaches the driver from, and
publishes that address through the driver (``POST /v1/shards``), which answers once every worker's
is known. A round then sends shard ``j`` of every worker's weights to its owner, which averages it
weighted by samples and answers the average: a reduce-scatter and an all-gather in one request per
peer, ``2 (n - 1) / n`` of the model in and out of each worker, whatever ``n`` is, and nothing
through the driver. The asynchronous engines push the same way: part ``j`` of every push to
owner ``j``, whose shard applies the rule and answers its part of the weights to continue from.

The driver keeps the control path (epochs, callbacks, progress, stop, the stats page) and a
mirror of the center: each owner sends its shard (``POST /v1/center/<key>``, with the rounds and
the pushes of each worker it holds) every ``mirror_every`` rounds and at every epoch end
(``sync``), or after an epoch-end fence that every worker passes on every shard (the
asynchronous engines), and the driver makes the center of them once all arrived. The epoch's
center, backups, callbacks and a restart after a lost worker all read that mirror; a restart
loses at most what came after it.
"""

from __future__ import annotations

import copy
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np

from .._errors import BarrierTimeoutError
from . import wire
from ._rules import OuterNesterov, UpdateRule
from ._store import ParameterStore, shard_bounds
from .client import ParameterClient

__all__ = ["ShardedCenter", "reachable_address"]


def reachable_address(toward: str) -> str:
    """The address of this machine's interface that reaches ``toward`` (a host name or address),
    where peers that reach that host reach this one too; ``SPARK_LOCAL_IP`` wins where it is set,
    as it does for Spark's own executors."""
    configured = os.environ.get("SPARK_LOCAL_IP")
    if configured:
        return configured
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((toward, 9))  # a datagram socket sends nothing on connect: a route lookup
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class ShardedCenter:
    """One worker's side of a sharded center: its shard's server and its lines to every peer's.

    Args:
        driver: the worker's connection to the driver's server (the directory and the mirror).
        secret: the stage's secret; every shard server of the stage authenticates with it.
        worker: this worker's id; ``num_workers``: how many share the center.
        center: the flat weights every worker starts the stage from.
        barrier_timeout: seconds a round or a fence waits for the missing workers.
        timeout: seconds a request to a peer may wait (a round waits on purpose).
        timeout_name: the engine option ``timeout`` comes from, named when the wait expires.
        rule: how pushes update each shard (the asynchronous engines); ``None`` for rounds.
        lock: apply pushes under each shard's lock (``False``: hogwild).
        outer: how a completed round moves each shard (``sync``).
        state: the layer state's element ranges in the whole center (see ``ParameterStore``);
            the shard's store gets those inside its shard.

    The shard's store gets its own copies of ``rule`` and ``outer`` (their state is the shard's).
    """

    def __init__(
        self,
        driver: ParameterClient,
        secret: bytes,
        worker: int,
        num_workers: int,
        center: np.ndarray,
        *,
        barrier_timeout: float,
        timeout: float,
        timeout_name: str,
        rule: UpdateRule | None = None,
        lock: bool = True,
        outer: OuterNesterov | None = None,
        state: Sequence[tuple[int, int]] = (),
    ) -> None:
        from ._app import ServerConfig
        from ._server import ParameterServer

        self.driver, self.secret, self.worker = driver, secret, worker
        self.num_workers, self.timeout = num_workers, timeout
        self.bounds = shard_bounds(center.size, num_workers)
        start, stop = self.bounds[worker]
        self.store = ParameterStore(
            center[start:stop].copy(),
            [(stop - start,)],
            num_workers,
            rule=copy.deepcopy(rule),
            lock=lock,
            barrier_timeout=barrier_timeout,
            outer=copy.deepcopy(outer),
            state=[
                (max(a, start) - start, min(b, stop) - start)
                for a, b in state
                if a < stop and b > start
            ],
        )
        config = ServerConfig(secret, max_payload_bytes=(stop - start) * 4 + (1 << 20))
        self.server = ParameterServer(
            self.store, config, host=reachable_address(driver.host), port=0
        ).start()
        self.peers: dict[int, ParameterClient] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.mirrored = -1
        self.mirror_seconds = 0.0
        self._stop_announced = False
        try:
            self.urls = driver.publish_shard(self.server.url)
        except BaseException:
            self.server.stop(timeout=5)
            raise
        for peer, url in enumerate(self.urls):
            if peer != worker:
                self.peers[peer] = ParameterClient(
                    url, secret, worker, timeout=timeout, timeout_name=timeout_name
                )
        if self.peers:
            self._pool = ThreadPoolExecutor(
                len(self.peers), thread_name_prefix="kerasonspark-shard"
            )

    def _each_peer(self, call: Callable[[ParameterClient, int, int], Any]) -> dict[int, Future]:
        """``call(client, start, stop)`` for every peer's shard, concurrently."""
        if self._pool is None:
            return {}
        futures = {
            peer: self._pool.submit(call, client, *self.bounds[peer])
            for peer, client in self.peers.items()
        }
        for peer, future in futures.items():
            # a peer that cannot be reached will not arrive here either: no wait for the timeout
            future.add_done_callback(partial(self._peer_done, peer))
        return futures

    def _peer_done(self, peer: int, future: Future) -> None:
        error = future.exception()
        if error is not None:
            self.store.report_failure(peer, f"{type(error).__name__}: {error}")

    def _gather(self, own: Callable[[int, int], Any], futures: dict[int, Future]) -> list[Any]:
        pieces: list[Any] = [None] * self.num_workers
        try:
            pieces[self.worker] = own(*self.bounds[self.worker])
        except BarrierTimeoutError:
            for future in futures.values():  # the peer's own error says more
                if future.done() and future.exception() is not None:
                    raise future.exception() from None  # type: ignore[misc]
            raise
        for peer, future in futures.items():
            pieces[peer] = future.result()
        return pieces

    def round(self, round: int, flat: np.ndarray, samples: int) -> np.ndarray:
        """Meet every worker at ``round`` with these weights; returns the sample-weighted average
        of all of them, shard by shard (each shard's outer rule applied)."""
        futures = self._each_peer(
            lambda client, start, stop: client.barrier(
                round, flat[start:stop], [(stop - start,)], samples
            )
        )
        return np.concatenate(
            self._gather(
                lambda start, stop: self.store.barrier(
                    round, self.worker, flat[start:stop], samples
                ),
                futures,
            )
        )

    def push(self, update: np.ndarray, window: int, samples: int) -> tuple[np.ndarray, list[int]]:
        """Push ``update`` (flat, float32 or bfloat16 bits) shard by shard; returns the weights
        to continue from and each shard's staleness."""

        def remote(client: ParameterClient, start: int, stop: int) -> tuple[np.ndarray, int]:
            reply, header = client.push(update[start:stop], [(stop - start,)], window, samples)
            return reply, int(header.get("staleness", 0))

        def own(start: int, stop: int) -> tuple[np.ndarray, int]:
            part = wire.as_float32(update[start:stop], wire.dtype_name(update))
            reply, _, staleness = self.store.push(self.worker, part, window, samples)
            return reply, staleness  # copied into the whole by the concatenation

        pieces = self._gather(own, self._each_peer(remote))
        return np.concatenate([p[0] for p in pieces]), [p[1] for p in pieces]

    def mirror(self, key: int, rounds: int = 0, pushes: dict[int, int] | None = None) -> None:
        """Copy this worker's shard to the driver: its ``key``-th copy of the stage, holding
        ``rounds`` rounds and ``pushes`` pushes per worker of it; once per key."""
        if key == self.mirrored:
            return
        started = time.perf_counter()
        self.driver.mirror(key, self.store.center, self.bounds[self.worker][0], rounds, pushes)
        self.mirror_seconds += time.perf_counter() - started
        self.mirrored = key

    def fence_and_mirror(self, key: int) -> None:
        """Wait until every worker sent its last push before fence ``key`` to this shard, then
        mirror it with the pushes it holds (the asynchronous engines' epoch end)."""
        started = time.perf_counter()
        futures = self._each_peer(lambda client, start, stop: client.fence(key))
        self.store.fence(key, self.worker, wait=True)
        for future in futures.values():
            future.result()
        self.mirror_seconds += time.perf_counter() - started
        self.mirror(key, pushes=dict(self.store.worker_pushes))

    @property
    def stop_requested(self) -> bool:
        """Whether a round's reply (or this worker's own shard) says every worker stops."""
        return self.store.stop_requested or any(c.stop_requested for c in self.peers.values())

    def announce_stop(self) -> None:
        """Tell every shard that training stops (once): the rounds waiting on this worker complete
        with the center as it is, on every shard alike."""
        if self._stop_announced:
            return
        self._stop_announced = True
        self.store.request_stop()
        for client in self.peers.values():
            client.stop()

    def report_failure(self, message: str) -> None:
        """Fail the open rounds of every shard, so no peer waits for this worker. Never raises."""
        self.store.report_failure(self.worker, message)
        for peer in self.peers:
            # a fresh connection: the worker's own may be broken mid-request
            with ParameterClient(self.urls[peer], self.secret, self.worker, timeout=10) as fresh:
                fresh.report_failure(message)

    def figures(self) -> dict[str, Any]:
        """Megabytes to and from the peers' shards and through this worker's own shard server,
        and what its shard counted (pushes' staleness, overlapping writes, refusals)."""
        figures = self.store.stats()
        shard = {k: figures[k] for k in ("staleness", "overlapping_writes", "refused_total")}
        return {
            "peer_mb_sent": sum(c.bytes_sent for c in self.peers.values()) / 1e6,
            "peer_mb_received": sum(c.bytes_received for c in self.peers.values()) / 1e6,
            "shard_mb_in": figures["mb_in"],
            "shard_mb_out": figures["mb_out"],
            "mirror_seconds": self.mirror_seconds,
            **({"shard": shard} if self.store.rule is not None else {}),
        }

    def close(self) -> None:
        """Close the lines to the peers and stop this worker's shard server."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for client in self.peers.values():
            client.close()
        self.server.stop(timeout=5)
