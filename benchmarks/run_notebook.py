"""Run examples/compare_strategies.ipynb top to bottom in a fresh kernel, check what it shows.

    python benchmarks/run_notebook.py --data ../shared/data/mnist
    python benchmarks/run_notebook.py --data ../shared/data/mnist --limit 0 --strategies single sync

The notebook compares strategies with ``kerasonspark.compare_strategies`` and draws the plot, as
the suite's ``tests/test_cli.py`` does through ``kerasonspark compare`` in its own process; this
script is the notebook's own check (a kernel of its own, a Spark session of its own: about 45 s
on tiny data, which the suite leaves here). It fails when a cell raises, when the table lacks a
strategy, or when the plot is missing, and prints the seconds it took.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "compare_strategies.ipynb"


def run_notebook(data: str, limit: int, strategies: list[str], folder: Path) -> None:
    """Execute the notebook in ``folder`` on ``data`` and check its outputs."""
    import nbclient
    import nbformat

    os.environ.update(
        KOS_NOTEBOOK_DATA=data,
        KOS_NOTEBOOK_LIMIT=str(limit),
        KOS_NOTEBOOK_STRATEGIES=" ".join(strategies),
    )
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    ).execute()
    outputs = [
        out
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    ]
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, errors
    shown = [out["data"] for out in outputs if out.output_type == "display_data"]
    table = next(data["text/markdown"] for data in shown if "text/markdown" in data)
    for strategy in strategies:
        assert f"| `{strategy}` |" in table, table
    assert any("image/png" in data for data in shown) and (folder / "compare.png").exists()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="folder with the MNIST files")
    parser.add_argument("--limit", type=int, default=6000, help="training images used; 0 for all")
    parser.add_argument("--strategies", nargs="+", default=["single", "sync"])
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kerasonspark-notebook-") as folder:
        run_notebook(str(Path(args.data).resolve()), args.limit, args.strategies, Path(folder))
    print(f"notebook ran top to bottom: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
