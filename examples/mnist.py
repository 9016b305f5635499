"""Reproduce the 2017 Dist-Keras MNIST run with kerasonspark.

    python examples/mnist.py                                   # sync, 2 workers, local Spark
    python examples/mnist.py --backend sync --workers 2 --data ../shared/data/mnist
    python examples/mnist.py --backend async --rule adag --window 5 --batch-size 16 --epochs 5 \\
        --workers 3 --data ../shared/data/mnist                # the 2017 run itself

Prints the three lines the 2017 run printed: training time, test accuracy, and the number of
parameter-server updates (rounds, for the synchronous engine). Same flags as
``kerasonspark train``; see ``python examples/mnist.py --help``. Without ``--data`` the script
uses ``data/mnist`` in this checkout or ``../shared/data/mnist`` beside it, where this project's
offline machines keep the files; failing those, the library's own places (``$KERASONSPARK_DATA``,
``~/.keras/datasets``, Keras's download).
"""

from __future__ import annotations

import sys
from pathlib import Path

from kerasonspark.cli import main

CHECKOUT = Path(__file__).resolve().parents[1]


def default_data(checkout: Path = CHECKOUT) -> Path | None:
    """The first MNIST folder this checkout knows of: its own ``data/mnist``, then
    ``../shared/data/mnist``."""
    for place in (checkout / "data" / "mnist", checkout.parent / "shared" / "data" / "mnist"):
        if place.is_dir():
            return place
    return None


def with_default_data(argv: list[str], checkout: Path = CHECKOUT) -> list[str]:
    """``argv`` with ``--data`` added when it has none and this checkout knows a folder."""
    found = default_data(checkout)
    if "--data" in argv or any(a.startswith("--data=") for a in argv) or found is None:
        return argv
    return [*argv, "--data", str(found)]


if __name__ == "__main__":
    sys.exit(main(["train", *with_default_data(sys.argv[1:])]))
