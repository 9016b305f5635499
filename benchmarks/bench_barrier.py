"""Round-barrier round trips of the reference CNN's weights (4.2 MB) through the parameter server.

    python benchmarks/bench_barrier.py --rounds 150 --repeat 3

Two client threads meet at every round, as two `sync` workers do; prints milliseconds per round.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from kerasonspark.parameter_server import (
    ParameterClient,
    ParameterServer,
    ParameterStore,
    ServerConfig,
    new_secret,
)

PARAMETERS = 1_048_853  # mnist_cnn()
SHAPES = [(PARAMETERS,)]


def milliseconds_per_round(rounds: int) -> float:
    secret = new_secret()
    store = ParameterStore(np.zeros(PARAMETERS, np.float32), SHAPES, num_workers=2)
    with ParameterServer(
        store, ServerConfig(secret, max_payload_bytes=PARAMETERS * 4 + (1 << 20))
    ) as server:

        def worker(worker_id: int) -> None:
            weights = np.random.default_rng(worker_id).random(PARAMETERS, dtype=np.float32)
            with ParameterClient(server.url, secret, worker_id, timeout=60) as client:
                for r in range(rounds):
                    client.barrier(r, weights, SHAPES, 10)

        threads = [threading.Thread(target=worker, args=(w,)) for w in (0, 1)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return (time.perf_counter() - started) / rounds * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results = [milliseconds_per_round(args.rounds) for _ in range(args.repeat)]
    print("ms per round: " + ", ".join(f"{r:.2f}" for r in results))


if __name__ == "__main__":
    main()
