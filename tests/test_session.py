"""The Spark session the trainer starts: settings that make local runs work out of the box."""

import os
import sys

import pytest

pytestmark = pytest.mark.spark


def test_local_python_workers_run_the_drivers_interpreter(spark):
    # Spark's default is whatever `python3` is on PATH: in an unactivated virtual environment that
    # interpreter cannot import kerasonspark (or the user's TensorFlow).
    executables = (
        spark.sparkContext.parallelize([0, 1], 2)
        .map(lambda _: __import__("sys").executable)
        .collect()
    )
    assert executables == [sys.executable, sys.executable]
    assert os.environ.get("PYSPARK_PYTHON") != sys.executable  # set only while the context started
