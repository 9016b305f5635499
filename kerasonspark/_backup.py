"""Driver side: back up a run and resume it, the way ``keras.callbacks.BackupAndRestore`` does for
``model.fit``.

A backup is a folder ``backup-<n>`` in the backup directory holding the center weights
(``center.npy``, a plain NumPy array file: no pickle) and ``manifest.json`` (the epoch to resume
in, each worker's applied exchanges for a backup taken mid-epoch, the history so far, the exchange
count, and the run's settings). It is written as ``backup-<n>.partial`` and renamed when complete,
then ``latest.json`` is replaced (write, then rename) to point at it, so a backup cut short by a
crash is never taken as the latest: :meth:`BackupStore.latest` reads only folders whose manifest
is complete, newest first, and falls back past one that does not load.

On resume the run's model, engine and data schema must match the backup's (the difference is
named if not); the number of workers and the master may change (a backup taken mid-epoch then
resumes at the start of its epoch, since its positions belong to the old workers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import ConfigurationError

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_LATEST = "latest.json"


@dataclass
class RunState:
    """One backup of a run.

    Attributes:
        epoch: the epoch to resume in.
        resume: per worker, the exchanges of ``epoch`` the center holds (empty at an epoch
            boundary).
        center: the center weights, flat float32.
        history: the per-epoch logs so far.
        exchanges: exchanges applied so far over the run.
        settings: what must match on resume (``model``, ``engine``, ``schema``) and what may
            change (``num_workers``, ``master``).
    """

    epoch: int
    center: np.ndarray
    resume: dict[int, int] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    exchanges: int = 0
    settings: dict[str, Any] = field(default_factory=dict)


def architecture(model: keras.Model) -> str:
    """The model's layers and weight shapes as text: the same for two builds of one architecture
    (Keras numbers layer names per process, so ``model.to_json()`` differs between them)."""
    return json.dumps(
        [[type(layer).__name__, [list(w.shape) for w in layer.weights]] for layer in model.layers]
    )


def run_settings(
    architecture: str, engine: str, schema: dict[str, Any], num_workers: int, master: str
) -> dict[str, Any]:
    """The settings a backup records: a fingerprint of the model's :func:`architecture`, the engine,
    the data schema (which must match to resume), the workers and the master (which may change)."""
    return {
        "model": hashlib.sha256(architecture.encode()).hexdigest()[:16],
        "engine": engine,
        "schema": schema,
        "num_workers": num_workers,
        "master": master,
    }


class BackupStore:
    """Atomic backups of one run in a local (or mounted shared) folder.

    Args:
        directory: the backup directory (created if missing).
        keep: complete backups kept (older ones are removed after a new one is in place).
    """

    def __init__(self, directory: str | os.PathLike[str], keep: int = 2) -> None:
        if "://" in str(directory):
            raise ConfigurationError(
                f"Backups go to a local or mounted shared folder. Received: {directory!r} "
                "(remote stores are not supported yet; mount it instead)."
            )
        self.directory = Path(directory)
        self.keep = max(keep, 1)

    def save(self, state: RunState) -> Path:
        """Write ``state`` as the latest backup, atomically; returns its folder."""
        self.directory.mkdir(parents=True, exist_ok=True)
        number = max((n for n, _ in self._complete()), default=0) + 1
        final = self.directory / f"backup-{number:06d}"
        partial = self.directory / f"backup-{number:06d}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        with open(partial / "center.npy", "wb") as f:
            np.save(f, np.ascontiguousarray(state.center, dtype=np.float32), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        manifest = {
            "format": FORMAT_VERSION,
            "epoch": state.epoch,
            "resume": {str(k): v for k, v in state.resume.items()},
            "history": state.history,
            "exchanges": state.exchanges,
            "settings": state.settings,
            "created": time.time(),
        }
        _write_atomically(partial / "manifest.json", json.dumps(manifest))
        os.replace(partial, final)
        _write_atomically(self.directory / _LATEST, json.dumps({"backup": final.name}))
        for _, old in self._complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _complete(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.directory.glob("backup-*"):
            number = path.name[len("backup-") :]
            if path.is_dir() and number.isdigit() and (path / "manifest.json").is_file():
                found.append((int(number), path))
        return sorted(found)

    def latest(self) -> RunState | None:
        """The newest complete backup, or ``None``; a backup that does not load is skipped with a
        warning."""
        if not self.directory.is_dir():
            return None
        for _, path in reversed(self._complete()):
            try:
                return _load(path)
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("Skipping backup %s, which does not load: %s", path, exc)
        return None

    def clear(self) -> None:
        """Remove every backup (a completed run deletes its backups, as Keras does)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".partial")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _load(path: Path) -> RunState:
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"backup format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
    center = np.load(path / "center.npy", allow_pickle=False)
    return RunState(
        epoch=int(manifest["epoch"]),
        center=center.astype(np.float32, copy=False),
        resume={int(k): int(v) for k, v in manifest["resume"].items()},
        history={k: [float(v) for v in values] for k, values in manifest["history"].items()},
        exchanges=int(manifest["exchanges"]),
        settings=dict(manifest["settings"]),
    )


def check_resumable(state: RunState, settings: dict[str, Any]) -> None:
    """Refuse to resume a backup taken with another model, engine or data schema, naming the
    difference.

    Raises:
        ConfigurationError: the model, engine or schema differs.
    """
    names = {
        "model": "model architecture (fingerprint)",
        "engine": "engine",
        "schema": "data schema",
    }
    for key, name in names.items():
        if state.settings.get(key) != settings.get(key):
            raise ConfigurationError(
                f"The backup was taken with another {name}: {state.settings.get(key)!r}, this run "
                f"has {settings.get(key)!r}. Resume with the same {key}, or point the backup at a "
                "new directory."
            )


@dataclass
class BackupPlan:
    """How one ``fit`` backs up: where, how often, with which settings, and what it resumed from.

    Attributes:
        store: the backup folder.
        save_freq: ``"epoch"`` (at each epoch boundary) or a number of exchanges
            (``stats["exchanges"]``: rounds or pushes) between two backups.
        settings: this run's :func:`run_settings`.
        resumed: the backup this run resumed from, or ``None``.
        delete_when_done: remove the backups when ``fit`` completes (Keras's ``delete_checkpoint``).
    """

    store: BackupStore
    save_freq: str | int
    settings: dict[str, Any]
    resumed: RunState | None = None
    delete_when_done: bool = True

    def __post_init__(self) -> None:
        valid = self.save_freq == "epoch" or (
            isinstance(self.save_freq, int)
            and not isinstance(self.save_freq, bool)
            and self.save_freq > 0
        )
        if not valid:
            raise ConfigurationError(
                f"Expected `save_freq` to be 'epoch' or a positive number of exchanges. "
                f"Received: save_freq={self.save_freq!r}."
            )
