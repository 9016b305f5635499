"""Reproduce the 2017 Dist-Keras MNIST run with kerasonspark.

    python examples/mnist.py                                   # sync, 2 workers, local Spark
    python examples/mnist.py --backend sync --workers 2 --data ../shared/data/mnist
    python examples/mnist.py --backend async --rule adag --window 5 --batch-size 16 --epochs 5 \\
        --workers 3 --data ../shared/data/mnist                # the 2017 run itself

Prints the three lines the 2017 run printed: training time, test accuracy, and the number of
parameter-server updates (rounds, for the synchronous engine). Same flags as
``kerasonspark train``; see ``python examples/mnist.py --help``.
"""

import sys

from kerasonspark.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
