"""Samples/s and test accuracy of engines on full MNIST, in one run on the same cores.

    python benchmarks/bench_engines.py --data ../shared/data/mnist --backends single sync
    python benchmarks/bench_engines.py --data ../shared/data/mnist \\
        --backends single sync async async:downpour hogwild --repeat 3

The same as ``kerasonspark compare`` (see ``kerasonspark compare --help``; its code is
:mod:`kerasonspark._compare`). A backend may carry an update rule after a colon
(``async:downpour``). With ``--repeat N`` every engine runs N times, interleaved, and the median
of each figure is reported.

Each engine trains the reference CNN for one epoch (batch 32, seed 0) on a DataFrame in Spark,
then the test set is evaluated on the executors. samples/s counts the training stage only
(``stats["train_seconds"]``: for distributed engines the barrier stage, for ``single`` its
``model.fit``); the wall column is the whole ``fit`` including data preparation.
"""

import sys

from kerasonspark.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
