import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from kerasonspark import MNIST_CNN_PARAMETERS, DataError, load_mnist, mnist_cnn
from kerasonspark import _datasets as datasets
from kerasonspark._datasets import read_idx

RNG = np.random.default_rng(0)
IMAGES = {
    "train": RNG.integers(0, 256, (12, 28, 28), dtype=np.uint8),
    "test": RNG.integers(0, 256, (5, 28, 28), dtype=np.uint8),
}
LABELS = {
    "train": RNG.integers(0, 10, 12, dtype=np.uint8),
    "test": RNG.integers(0, 10, 5, dtype=np.uint8),
}


def write_idx(path, array, compress=True):
    magic = 2051 if array.ndim == 3 else 2049
    data = (
        struct.pack(">I", magic)
        + b"".join(struct.pack(">I", d) for d in array.shape)
        + array.tobytes()
    )
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


def write_idx_folder(folder, compress=True):
    suffix = ".gz" if compress else ""
    for split, prefix in (("train", "train"), ("test", "t10k")):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", IMAGES[split], compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", LABELS[split], compress)


def check(loaded, normalized=True):
    (x_train, y_train), (x_test, y_test) = loaded
    assert x_train.shape == ((12, 28, 28, 1) if normalized else (12, 28, 28))
    np.testing.assert_array_equal(y_train, LABELS["train"])
    np.testing.assert_array_equal(y_test, LABELS["test"])
    expected = IMAGES["test"] / 255.0 if normalized else IMAGES["test"]
    np.testing.assert_allclose(x_test.reshape(5, 28, 28), expected, rtol=1e-6)


@pytest.mark.parametrize("compress", [True, False])
def test_reads_idx_files(tmp_path, compress):
    write_idx_folder(tmp_path, compress)
    check(load_mnist(tmp_path))
    check(load_mnist(tmp_path, normalize=False), normalized=False)


def test_reads_keras_npz(tmp_path):
    np.savez(
        tmp_path / "mnist.npz",
        x_train=IMAGES["train"],
        y_train=LABELS["train"],
        x_test=IMAGES["test"],
        y_test=LABELS["test"],
    )
    check(load_mnist(tmp_path))
    check(load_mnist(tmp_path / "mnist.npz"))


def test_reads_dist_keras_csv_with_or_without_header(tmp_path):
    for split, header in (("train", True), ("test", False)):
        rows = np.column_stack([LABELS[split], IMAGES[split].reshape(len(LABELS[split]), -1)])
        with open(tmp_path / f"mnist_{split}.csv", "w") as f:
            if header:
                f.write("label," + ",".join(f"pixel{i}" for i in range(784)) + "\n")
            np.savetxt(f, rows, fmt="%d", delimiter=",")
    check(load_mnist(tmp_path))


def test_environment_variable_is_searched(tmp_path, monkeypatch):
    (tmp_path / "mnist").mkdir()
    write_idx_folder(tmp_path / "mnist")
    monkeypatch.setenv("KERASONSPARK_DATA", str(tmp_path))
    check(load_mnist())


def test_the_library_does_not_search_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    write_idx_folder(tmp_path / "data" / "mnist")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KERASONSPARK_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datasets.mnist_locations() == [tmp_path / "home" / ".keras" / "datasets"]
    check(load_mnist(tmp_path / "data" / "mnist"))  # found when the script names it


def test_the_example_finds_the_data_beside_its_checkout(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "mnist_example", Path(__file__).parents[1] / "examples" / "mnist.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    checkout = tmp_path / "project"
    assert example.default_data(checkout) is None
    (tmp_path / "shared" / "data" / "mnist").mkdir(parents=True)
    assert example.default_data(checkout) == tmp_path / "shared" / "data" / "mnist"
    (checkout / "data" / "mnist").mkdir(parents=True)
    # the project's own folder first
    assert example.default_data(checkout) == checkout / "data" / "mnist"
    assert example.with_default_data(["--epochs", "2"], checkout) == [
        "--epochs",
        "2",
        "--data",
        str(checkout / "data" / "mnist"),
    ]
    assert example.with_default_data(["--data", "x"], checkout) == ["--data", "x"]


def test_missing_data_lists_every_place_searched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERASONSPARK_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    with pytest.raises(DataError) as missing:
        load_mnist(tmp_path / "given")
    text = str(missing.value)
    assert (
        str(tmp_path / "given") in text
        and str(tmp_path / "env") in text
        and ".keras/datasets" in text
    )


def test_truncated_idx_is_refused(tmp_path):
    write_idx(tmp_path / "x.gz", IMAGES["test"])
    with gzip.open(tmp_path / "x.gz") as f:
        data = f.read()[:-10]
    with gzip.open(tmp_path / "y.gz", "wb") as f:
        f.write(data)
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "y.gz")


def test_reference_cnn_has_the_2017_parameter_count_and_layers():
    model = mnist_cnn()
    assert model.count_params() == MNIST_CNN_PARAMETERS == 1_048_853
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Conv2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dense"]
    assert model.output_shape == (None, 10)
