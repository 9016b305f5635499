"""MNIST from the places people keep it: IDX files, a Keras ``mnist.npz``, or Dist-Keras CSV."""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import numpy as np

from ._errors import DataError

logger = logging.getLogger(__name__)

Split = tuple[np.ndarray, np.ndarray]

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CSV_FILES = {"train": "mnist_train.csv", "test": "mnist_test.csv"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a uint8 array.

    Raises:
        DataError: the file is not IDX (bad magic number or truncated).
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (its magic number is wrong).")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DataError(
            f"{path} is truncated: its header promises {expected} bytes of data. "
            f"Received: {len(data) - offset} bytes."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_folder(folder: Path) -> tuple[Split, Split] | None:
    splits = []
    for split in ("train", "test"):
        images, labels = (_find(folder, n) for n in _IDX_FILES[split])
        if images is None or labels is None:
            return None
        splits.append((read_idx(images), read_idx(labels)))
    return splits[0], splits[1]


def _load_npz(path: Path) -> tuple[Split, Split]:
    with np.load(path, allow_pickle=False) as f:
        return (f["x_train"], f["y_train"]), (f["x_test"], f["y_test"])


def _read_csv(path: Path) -> Split:
    with open(path) as f:
        first = f.readline()
    skip = 0 if first.split(",")[0].strip().isdigit() else 1
    table = np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataError(
            f"{path} should hold a label then 784 pixels per row. Received: rows of "
            f"{table.shape[-1]} values."
        )
    return table[:, 1:].reshape(-1, 28, 28).astype(np.uint8), table[:, 0].astype(np.uint8)


def _load_from(location: Path) -> tuple[Split, Split] | None:
    if location.is_file() and location.suffix == ".npz":
        return _load_npz(location)
    if not location.is_dir():
        return None
    found = _load_idx_folder(location)
    if found is not None:
        return found
    if (location / "mnist.npz").is_file():
        return _load_npz(location / "mnist.npz")
    csvs = [location / _CSV_FILES[s] for s in ("train", "test")]
    if all(p.is_file() for p in csvs):
        return _read_csv(csvs[0]), _read_csv(csvs[1])
    return None


def mnist_locations(path: str | os.PathLike | None = None) -> list[Path]:
    """The places :func:`load_mnist` looks, in order (before Keras's download).

    ``path``; ``$KERASONSPARK_DATA`` (and its ``mnist/``); ``~/.keras/datasets`` (where Keras
    caches its download). A library does not search the folders of the machine it runs on; a
    script that knows where its data lives passes ``path`` (``examples/mnist.py`` does).
    """
    places = []
    if path is not None:
        places.append(Path(path).expanduser())
    if os.environ.get("KERASONSPARK_DATA"):
        env = Path(os.environ["KERASONSPARK_DATA"]).expanduser()
        places += [env / "mnist", env]
    places.append(Path("~/.keras/datasets").expanduser())
    unique: list[Path] = []
    for place in places:
        if place not in unique:
            unique.append(place)
    return unique


def load_mnist(
    path: str | os.PathLike | None = None, normalize: bool = True
) -> tuple[Split, Split]:
    """Load MNIST as ``((x_train, y_train), (x_test, y_test))``.

    Looks in ``path`` (a folder with the four IDX files, ``.gz`` or not, a ``mnist.npz``, or
    ``mnist_train.csv``/``mnist_test.csv`` with a label then 784 pixels per row; or an ``.npz``
    file), then the places :func:`mnist_locations` lists, then Keras's own download where there
    is a network.

    Args:
        path: where the files are; optional.
        normalize: return float32 images of shape ``(n, 28, 28, 1)`` in [0, 1]; otherwise the raw
            uint8 ``(n, 28, 28)`` images.

    Returns:
        Train and test splits; labels are int64 class indices.

    Raises:
        DataError: nothing was found; the message lists every place searched.
    """
    tried = []
    loaded = None
    for place in mnist_locations(path):
        tried.append(str(place))
        loaded = _load_from(place)
        if loaded is not None:
            logger.info("Loaded MNIST from %s", place)
            break
    if loaded is None:
        try:
            import keras

            loaded = keras.datasets.mnist.load_data()
        except Exception as exc:  # no network, or no Keras: say where we looked
            tried.append(f"keras.datasets.mnist.load_data() ({type(exc).__name__}: {exc})")
            raise DataError(
                "MNIST was not found. Looked in: "
                + "; ".join(tried)
                + ". Put the four IDX .gz files, "
                "mnist.npz or mnist_train.csv/mnist_test.csv in one of them, or pass `path=`."
            ) from None
    (x_train, y_train), (x_test, y_test) = loaded
    if normalize:
        x_train = (x_train.astype(np.float32) / 255.0).reshape(-1, 28, 28, 1)
        x_test = (x_test.astype(np.float32) / 255.0).reshape(-1, 28, 28, 1)
    return (x_train, y_train.astype(np.int64)), (x_test, y_test.astype(np.int64))
