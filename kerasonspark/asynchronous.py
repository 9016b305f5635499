"""The pull / train / push loop shared by the asynchronous engines (``async`` and ``hogwild``).

Each worker starts from the center weights, trains ``window`` local steps with its own
optimizer, and pushes its change (or, for elastic averaging, its weights). The server applies
the push under the configured :class:`~kerasonspark.parameter_server.UpdateRule` and answers
with the weights the worker continues from, so one exchange is one round trip on one
keep-alive connection. Workers never wait for each other.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .engine import EngineOptions, TrainingJob, TrainingResult
from .errors import WorkerError
from .parameter_server import ParameterClient, ParameterServer, ParameterStore, ServerConfig, new_secret, wire
from .parameter_server.rules import RULES, UpdateRule, make_rule
from .serialization import get_flat_weights, set_flat_weights
from .worker import Exchange, explain_failure

if TYPE_CHECKING:
    import keras

DELTA_DTYPES = ("float32", "bfloat16")


@dataclass
class AsyncOptions(EngineOptions):
    """Options of the asynchronous engines.

    Attributes:
        rule: ``"adag"`` (default), ``"downpour"``, ``"dynsgd"`` or ``"easgd"``.
        window: local steps between two exchanges.
        alpha: elastic averaging's moving rate (``easgd``); default ``rho * elastic_lr``.
        rho: elastic averaging's coupling strength (``easgd``), default 5.0.
        elastic_lr: the learning rate ``rho`` is multiplied by (``easgd``), default 0.1.
        delta_dtype: ``"float32"`` or ``"bfloat16"``: the precision of what workers push.
            bfloat16 halves the upload (float16 is not offered: small deltas fall into its
            subnormal range, where they lose precision and NumPy converts them 50x slower);
            the center and the replies stay float32.
        timeout: seconds a worker waits for the parameter server before failing.
    """

    rule: str = "adag"
    window: int = 5
    alpha: float | None = None
    rho: float | None = None
    elastic_lr: float = 0.1
    delta_dtype: str = "float32"
    timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"Expected `rule` in {sorted(RULES)}. Received: rule={self.rule!r}.")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"Expected `window` to be a positive integer. Received: window={self.window!r}.")
        if self.delta_dtype not in DELTA_DTYPES:
            raise ValueError(f"Expected `delta_dtype` in {DELTA_DTYPES}. Received: delta_dtype={self.delta_dtype!r}.")
        if self.rule != "easgd" and (self.alpha is not None or self.rho is not None):
            raise ValueError(f"`alpha` and `rho` apply to rule 'easgd' only. Received: rule={self.rule!r}.")
        if self.rule == "easgd":
            make_rule("easgd", alpha=self.resolved_alpha)  # validates the range

    @property
    def resolved_alpha(self) -> float:
        return self.alpha if self.alpha is not None else (5.0 if self.rho is None else self.rho) * self.elastic_lr

    def make_rule(self) -> UpdateRule:
        """The configured update rule."""
        return make_rule("easgd", alpha=self.resolved_alpha) if self.rule == "easgd" else make_rule(self.rule)


class PushPullExchange(Exchange):
    """Worker side: push every ``window`` steps, continue from the server's reply."""

    def __init__(self, url: str, secret: bytes, window: int, payload: str, delta_dtype: str, timeout: float) -> None:
        self.url, self.secret, self.window, self.payload = url, secret, window, payload
        self.delta_dtype, self.timeout = delta_dtype, timeout
        self.client: ParameterClient | None = None
        self.base: np.ndarray | None = None
        self.pushes = 0
        self.staleness: list[int] = []

    def start(self, model: "keras.Model", worker: int) -> None:
        self.client = ParameterClient(self.url, self.secret, worker, timeout=self.timeout)
        self.shapes = [tuple(w.shape) for w in model.weights]
        self.base, _ = self.client.pull()
        set_flat_weights(model, self.base)

    def schedule(self, steps: int, epoch: int) -> list[int]:
        runs = [self.window] * (steps // self.window)
        return runs + [steps % self.window] if steps % self.window else runs

    def exchange(self, model: "keras.Model", samples: int) -> None:
        if samples == 0:
            return
        weights = get_flat_weights(model)
        if self.payload == "delta":
            weights -= self.base
        update = wire.to_bfloat16(weights) if self.delta_dtype == "bfloat16" else weights
        reply, header = self.client.push(update, self.shapes, window=self.window, samples=samples)
        set_flat_weights(model, reply)
        self.base = reply
        self.pushes += 1
        self.staleness.append(header.get("staleness", 0))

    def finish(self, model: "keras.Model") -> dict[str, Any]:
        client = self.client
        seconds = max(client.seconds, 1e-9)
        return {"pushes": self.pushes, "exchange_seconds": client.seconds,
                "mb_sent": client.bytes_sent / 1e6, "mb_received": client.bytes_received / 1e6,
                "exchange_mb_per_s": (client.bytes_sent + client.bytes_received) / 1e6 / seconds,
                "median_staleness": float(np.median(self.staleness)) if self.staleness else 0.0}

    def report_failure(self, message: str) -> None:
        if self.client is not None:
            self.client.report_failure(message)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def run_asynchronous(job: TrainingJob, options: AsyncOptions, lock: bool) -> TrainingResult:
    """Train ``job`` with workers that push to a driver-side parameter server without waiting.

    Args:
        lock: apply pushes under the server's lock (``async``) or without it (``hogwild``).
    """
    rule = options.make_rule()
    secret = new_secret()
    store = ParameterStore(job.spec.weights, job.spec.shapes, job.config.num_workers, rule=rule, lock=lock)
    config = ServerConfig(secret, max_payload_bytes=job.spec.weights.nbytes + (1 << 20))
    with ParameterServer(store, config, host=job.server_host) as server:
        exchange = PushPullExchange(server.url, secret, options.window, rule.payload, options.delta_dtype, options.timeout)
        started = time.perf_counter()
        try:
            reports = job.run_workers(exchange)
        except WorkerError as exc:
            raise explain_failure(exc, store.failures) from exc
        seconds = time.perf_counter() - started
        server_stats = store.stats()
    for report in reports:
        report["samples_per_second"] = report["samples"] * job.config.epochs / max(report["seconds"], 1e-9)
    return job.result(reports, store.center.copy(), seconds, {
        "rule": rule.name,
        "window": options.window,
        "updates": server_stats["updates"],
        "refused": server_stats["refused_total"],
        "staleness": server_stats["staleness"],
        "overlapping_writes": server_stats["overlapping_writes"],
        "worker_pushes": server_stats["worker_pushes"],
        "parameter_server": server_stats,
    })
