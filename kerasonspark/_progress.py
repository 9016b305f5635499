"""The driver's live progress bar: one updating line per epoch, or plain lines where output is a
file.

Written here rather than taken from ``keras.utils.Progbar`` for two reasons: Keras's bar treats
every POSIX process as an interactive terminal (``"posix" in sys.modules``), so in a log file or
a Spark driver's captured stdout it writes backspaces and carriage returns; and it formats every
value as a float, where rounds, pushes and staleness are counts.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import IO


def is_interactive(stream: IO[str]) -> bool:
    """Whether ``stream`` shows a line that is rewritten in place (a terminal or a notebook)."""
    return (hasattr(stream, "isatty") and stream.isatty()) or _in_notebook()


def _in_notebook() -> bool:
    # Imported is not running: libraries import IPython and ipykernel on their own. A notebook's
    # kernel is the one place where the running shell is a ZMQInteractiveShell.
    ipython = sys.modules.get("IPython")
    shell = (
        ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    )
    return type(shell).__name__ == "ZMQInteractiveShell"


def _format(value: float) -> str:
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value)}"
    return f"{value:.4f}" if abs(value) >= 1e-3 else f"{value:.4e}"


class ProgressBar:
    """Progress of the run's epochs, the way ``model.fit(verbose=...)`` shows it.

    Args:
        verbose: 0 silent, 1 a live bar per epoch, 2 one line per epoch.
        epochs: the run's last epoch (for ``Epoch e/epochs``).
        samples_per_epoch: training rows over all workers.
        stream: where to write (standard output by default).
        plain_interval: seconds between two lines when the stream is not interactive.
    """

    def __init__(
        self,
        verbose: int,
        epochs: int,
        samples_per_epoch: int,
        stream: IO[str] | None = None,
        plain_interval: float = 10.0,
    ) -> None:
        self.verbose, self.epochs, self.target = verbose, epochs, max(samples_per_epoch, 1)
        self.stream = stream or sys.stdout
        self.dynamic = is_interactive(self.stream)
        self.interval = 0.1 if self.dynamic else plain_interval
        self.width = 0
        self.started = self.last = 0.0

    def start_epoch(self, epoch: int) -> None:
        """Begin the bar of ``epoch`` (0-based)."""
        self.started, self.last, self.width = time.monotonic(), 0.0, 0
        if self.verbose:
            self._write(f"Epoch {epoch + 1}/{self.epochs}\n")

    def line(self, samples: int, values: Mapping[str, float], final: bool = False) -> str:
        """The text of one update: samples done of the epoch's, elapsed seconds, then the values."""
        done = min(samples, self.target)
        filled = int(20 * done / self.target)
        bar = "=" * filled + (">" if filled < 20 else "") + "." * max(19 - filled, 0)
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{done}/{self.target} [{bar}]", f"{elapsed:.0f}s", f"{rate:.0f} samples/s"]
        if not final and rate > 0:
            parts[1] = f"ETA {(self.target - done) / rate:.0f}s"
        parts += [f"{k}: {_format(v)}" for k, v in values.items()]
        return " - ".join(parts)

    def update(self, samples: int, values: Mapping[str, float]) -> None:
        """Show progress within the epoch (throttled)."""
        now = time.monotonic()
        if self.verbose != 1 or now - self.last < self.interval:
            return
        self.last = now
        self._show(self.line(samples, values), final=False)

    def end_epoch(self, values: Mapping[str, float]) -> None:
        """Show the epoch's final line with its merged logs."""
        if self.verbose:
            self._show(self.line(self.target, values, final=True), final=True)

    def _show(self, text: str, final: bool) -> None:
        if self.dynamic:
            pad = " " * max(self.width - len(text), 0)
            self.width = len(text)
            self._write(f"\r{text}{pad}" + ("\n" if final else ""))
        else:
            self._write(text + "\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
