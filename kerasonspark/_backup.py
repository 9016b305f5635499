"""Driver side: back up a run and resume it, the way ``keras.callbacks.BackupAndRestore`` does for
``model.fit``.

A backup is a folder ``backup-<n>`` in the backup directory holding the center weights
(``center.npy``, a plain NumPy array file: no pickle) and ``manifest.json`` (the epoch to resume
in, each worker's applied exchanges for a backup taken mid-epoch, the history so far, the exchange
count, and the run's settings). The manifest is written last (under a temporary name, then
renamed), then ``latest.json`` is replaced the same way to point at the folder, so a backup cut
short by a crash is never taken as the latest: :meth:`BackupStore.latest` reads only folders
whose manifest is complete, newest first, and falls back past one that does not load. The folder
may be local or on any store ``pyarrow.fs`` reaches (``s3://``, ``hdfs://``, ...).

On resume the run's model, engine and data schema must match the backup's (the difference is
named if not); the number of workers and the master may change (a backup taken mid-epoch then
resumes at the start of its epoch, since its positions belong to the old workers).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
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
    """Atomic backups of one run in a folder of any file system ``pyarrow.fs`` reaches: a local or
    mounted path, or a URI (``s3://bucket/run``, ``hdfs://namenode/run``, ``gs://``,
    ``abfs://``, ``file://``), with that store's credentials as pyarrow finds them.

    Backups are written by the driver (or the Spark Connect client), never by the executors. A
    backup folder counts once its manifest is in it, and the manifest is written last, under a
    temporary name renamed into place (a copy on object stores, where it is just as final).

    Args:
        directory: the backup directory (created if missing).
        keep: complete backups kept (older ones are removed after a new one is in place).

    Raises:
        ConfigurationError: ``pyarrow.fs`` does not know the URI's scheme.
    """

    def __init__(self, directory: str | os.PathLike[str], keep: int = 2) -> None:
        from pyarrow import fs

        self.directory = str(directory) if "://" in str(directory) else os.fspath(directory)
        if "://" in self.directory:
            try:
                self.files, self.root = fs.FileSystem.from_uri(self.directory)
            except Exception as exc:  # an unknown scheme, a store pyarrow was built without
                raise ConfigurationError(
                    f"Backups cannot go to {self.directory!r}: {exc}. Give a local or mounted "
                    "folder, or a URI of a file system pyarrow.fs reaches (s3://, hdfs://, "
                    "gs://, abfs://, file://)."
                ) from None
        else:
            self.files, self.root = fs.LocalFileSystem(), os.path.abspath(self.directory)
        self.local = isinstance(self.files, fs.LocalFileSystem)
        self.keep = max(keep, 1)

    def _path(self, *names: str) -> str:
        return "/".join([self.root.rstrip("/"), *names])

    def _write(self, path: str, data: bytes) -> None:
        """``data`` at ``path``, via a temporary name renamed into place (flushed to disk first
        where the store is local)."""
        temporary = path + ".partial"
        if self.local:
            with open(temporary, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        else:
            with self.files.open_output_stream(temporary) as stream:
                stream.write(data)
        self.files.move(temporary, path)

    def save(self, state: RunState) -> str:
        """Write ``state`` as the latest backup, atomically; returns its folder."""
        self.files.create_dir(self.root, recursive=True)
        number = max((n for n, _ in self._complete()), default=0) + 1
        final = self._path(f"backup-{number:06d}")
        # a crash's leftover under this number (no manifest, so never taken) is replaced
        self.files.delete_dir_contents(final, missing_dir_ok=True)
        self.files.create_dir(final, recursive=True)
        center = io.BytesIO()
        np.save(center, np.ascontiguousarray(state.center, dtype=np.float32), allow_pickle=False)
        self._write(final + "/center.npy", center.getvalue())
        manifest = {
            "format": FORMAT_VERSION,
            "epoch": state.epoch,
            "resume": {str(k): v for k, v in state.resume.items()},
            "history": state.history,
            "exchanges": state.exchanges,
            "settings": state.settings,
            "created": time.time(),
        }
        # last, and atomically: a folder is a backup once its manifest is there
        self._write(final + "/manifest.json", json.dumps(manifest).encode())
        self._write(self._path(_LATEST), json.dumps({"backup": final.rsplit("/", 1)[1]}).encode())
        for _, old in self._complete()[: -self.keep]:
            self.files.delete_dir(old)
        return final

    def _complete(self) -> list[tuple[int, str]]:
        from pyarrow import fs

        try:
            entries = self.files.get_file_info(fs.FileSelector(self.root))
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            number = entry.base_name[len("backup-") :]
            if (
                entry.type == fs.FileType.Directory
                and entry.base_name.startswith("backup-")
                and number.isdigit()
                and self.files.get_file_info(entry.path + "/manifest.json").type == fs.FileType.File
            ):
                found.append((int(number), entry.path))
        return sorted(found)

    def latest(self) -> RunState | None:
        """The newest complete backup, or ``None``; a backup that does not load is skipped with a
        warning."""
        for _, path in reversed(self._complete()):
            try:
                return self._load(path)
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("Skipping backup %s, which does not load: %s", path, exc)
        return None

    def _read(self, path: str) -> bytes:
        with self.files.open_input_stream(path) as stream:
            return stream.read()

    def _load(self, path: str) -> RunState:
        manifest = json.loads(self._read(path + "/manifest.json"))
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"backup format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
        center = np.load(io.BytesIO(self._read(path + "/center.npy")), allow_pickle=False)
        return RunState(
            epoch=int(manifest["epoch"]),
            center=center.astype(np.float32, copy=False),
            resume={int(k): int(v) for k, v in manifest["resume"].items()},
            history={k: [float(v) for v in values] for k, values in manifest["history"].items()},
            exchanges=int(manifest["exchanges"]),
            settings=dict(manifest["settings"]),
        )

    def clear(self) -> None:
        """Remove every backup (a completed run deletes its backups, as Keras does)."""
        self.files.delete_dir_contents(self.root, missing_dir_ok=True)
        with contextlib.suppress(OSError):
            self.files.delete_dir(self.root)


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
