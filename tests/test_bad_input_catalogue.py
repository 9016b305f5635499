"""The bad-input catalogue of docs/guide/bad-input.md, row by row: each bad input gets its
documented error.

Every row of that page's table is a scenario here; the test runs it and checks the exception
(or HTTP status) and that the message holds the page's excerpt word for word. Rows marked
"before any Spark job" also check that Spark ran no job. A last test keeps the page and this table
the same, so the catalogue cannot drift from what users get.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest
from pyspark.sql import functions as F

from kerasonspark import SparkTrainer, numpy_to_dataframe
from kerasonspark.ml import KerasEstimator
from kerasonspark.parameter_server import (
    ParameterServer,
    ParameterStore,
    ServerConfig,
    make_rule,
    new_secret,
    wire,
)
from kerasonspark.parameter_server import _auth as auth

from conftest import make_blobs, small_model

pytestmark = pytest.mark.spark
CATALOGUE_PAGE = Path(__file__).resolve().parents[1] / "docs" / "guide" / "bad-input.md"
BEFORE_JOBS = "before any Spark job"


def trainer(spark, **kwargs) -> SparkTrainer:
    return SparkTrainer(
        small_model(), backend="sync", num_workers=2, spark=spark, verbose=0, **kwargs
    )


def blobs_frame(spark, n: int = 100, **kwargs):
    x, y = make_blobs(n)
    return numpy_to_dataframe(spark, x, y, **kwargs)


# -- the parameter server's rows: raw requests to a live server ---------------------------------
class Server:
    def __init__(self, **config) -> None:
        self.secret = new_secret()
        self.store = ParameterStore(
            np.zeros(8, np.float32), [(8,)], num_workers=2, rule=make_rule("downpour")
        )
        self.server = ParameterServer(
            self.store, ServerConfig(self.secret, max_payload_bytes=4096, **config)
        ).start()

    def send(self, data: bytes) -> tuple[int, str]:
        center = self.store.center.copy()
        with socket.create_connection((self.server.host, self.server.port), timeout=20) as sock:
            sock.sendall(data)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
                head, _, body = received.partition(b"\r\n\r\n")
                length = re.search(rb"Content-Length: (\d+)", head)
                if length and len(body) >= int(length.group(1)):
                    break
        self.server.stop()
        head, _, body = received.partition(b"\r\n\r\n")
        assert np.array_equal(self.store.center, center), "a refused request changed the weights"
        return int(head.split(b" ")[1]), json.loads(body)["error"]

    def signed(
        self,
        method: str,
        path: str,
        body: bytes,
        seq: int = 1,
        length: int | None = None,
        secret: bytes | None = None,
    ) -> bytes:
        """A request signed for ``length`` bytes (the body's by default) with the run's secret."""
        length = len(body) if length is None else length
        value = auth.sign(secret or self.secret, method, path, 0, seq, length)
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Content-Length: {length}",
            f"{auth.HEADER}: {value}",
            f"Content-Type: {wire.CONTENT_TYPE}",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def push_body(values: np.ndarray, shapes=((8,),), samples: int = 1) -> bytes:
    return b"".join(bytes(p) for p in wire.encode(values, shapes, window=1, samples=samples))


def replayed(spark) -> tuple[int, str]:
    server = Server()
    request = server.signed("POST", "/v1/push", push_body(np.ones(8, np.float32)), seq=5)
    with socket.create_connection((server.server.host, server.server.port), timeout=20) as sock:
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    return server.send(request)


def foreign_signature(spark) -> tuple[int, str]:
    server = Server()
    return server.send(server.signed("GET", "/v1/weights", b"", secret=new_secret()))


def uncompiled(spark):
    SparkTrainer(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))


def missing_java(spark):
    import os

    from kerasonspark._session import require_java

    saved = {k: os.environ.get(k) for k in ("JAVA_HOME", "PATH")}
    os.environ.pop("JAVA_HOME", None)
    os.environ["PATH"] = "/nonexistent"
    try:
        require_java()
    finally:
        for key, value in saved.items():
            if value is not None:
                os.environ[key] = value


def two_input_model(spark):
    a, b = keras.Input((4,)), keras.Input((4,))
    model = keras.Model(
        [a, b], keras.layers.Dense(2, activation="softmax")(keras.layers.Concatenate()([a, b]))
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    x, y = make_blobs(40)
    SparkTrainer(model, num_workers=2, spark=spark, verbose=0).fit((x, y))


def scheduled_rate_tuned(spark):
    model = small_model()
    model.compile(
        keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(0.01, 10, 0.9)),
        "sparse_categorical_crossentropy",
    )
    df = spark.createDataFrame([([0.0] * 16, 0)], ["features", "label"])
    KerasEstimator(model=model, learningRate=0.1).fit(df)


def scaled_schedule(spark):
    model = small_model()
    model.compile(
        keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(0.01, 10, 0.9)),
        "sparse_categorical_crossentropy",
    )
    SparkTrainer(
        model, backend="sync", backend_options={"lr_scale": "linear"}, spark=spark, verbose=0
    ).fit(make_blobs(100))


def encrypted_cluster(spark):
    from kerasonspark._session import check_weights_privacy

    check_weights_privacy({"spark.network.crypto.enabled": "true"}, "10.0.0.5")


def labels_out_of_range(spark):
    x, y = make_blobs(100)
    y[5], y[6] = 4, -1
    trainer(spark).fit(numpy_to_dataframe(spark, x, y))


def nan_rows(spark):
    x, y = make_blobs(100)
    x[3, 0] = np.nan
    trainer(spark).fit(numpy_to_dataframe(spark, x, y))


def negative_weight_column(spark):
    x, y = make_blobs(100)
    df = numpy_to_dataframe(spark, x, y).withColumn("weight", F.when(F.rand(seed=0) < 2.0, -1.0))
    trainer(spark).fit(df.limit(3), sample_weight="weight")


def nan_numpy(spark):
    x, y = make_blobs(100)
    x[7] = np.nan
    trainer(spark).fit((x, y))


def validation_of_wrong_size(spark):
    x, y = make_blobs(100)
    trainer(spark).fit((x, y), validation_data=(x[:, :8], y))


def empty_partition_only(spark):
    x, y = make_blobs(100)
    trainer(spark).fit(x[:0], y[:0])


def mismatched_backup(spark):
    from kerasonspark._backup import RunState, check_resumable

    state = RunState(
        epoch=1, center=np.zeros(3, np.float32), settings={"model": "a1b2", "engine": "sync"}
    )
    check_resumable(state, {"model": "c3d4", "engine": "sync"})


# (bad input, result, message excerpt, when refused, scenario)
Scenario = Callable[..., object]
CATALOGUE: list[tuple[str, str, str, str, Scenario]] = [
    (
        "Features of the wrong size (NumPy)",
        "DataError",
        "Each sample in the training features must have 16 values to fit the model's input "
        "shape (16,). Received: features of shape (100, 15).",
        BEFORE_JOBS,
        lambda spark: trainer(spark).fit((make_blobs(100)[0][:, :15], make_blobs(100)[1])),
    ),
    (
        "Features of the wrong size (DataFrame column)",
        "DataError",
        "Each sample must have 16 values to fit the model's input shape (16,). Received: feature "
        "arrays of length 12 in column 'features'.",
        "first data pass",
        lambda spark: trainer(spark).fit(
            numpy_to_dataframe(spark, make_blobs(100)[0][:, :12], make_blobs(100)[1])
        ),
    ),
    (
        "Label column missing",
        "DataError",
        "The training DataFrame has no label column 'label'. Its columns: ['features', 'target'].",
        BEFORE_JOBS,
        lambda spark: trainer(spark).fit(blobs_frame(spark, label="target")),
    ),
    (
        "Non-numeric feature column",
        "DataError",
        "Feature column 'features' must be array<float|double> or an ML Vector. Received: string.",
        BEFORE_JOBS,
        lambda spark: trainer(spark).fit(spark.createDataFrame([("a", 1)], ["features", "label"])),
    ),
    (
        "Labels outside the model's classes",
        "DataError",
        "2 label(s) outside the model's classes (2 in partition 0); map labels to "
        "0..num_classes-1 or widen the output layer.",
        "first data pass",
        labels_out_of_range,
    ),
    (
        "NaN or Inf in DataFrame rows",
        "DataError",
        "1 row(s) with NaN, Inf or null features or labels (1 in partition 0); drop or impute them.",
        "first data pass",
        nan_rows,
    ),
    (
        "Negative, NaN or null sample weights",
        "DataError",
        "3 sample weight(s) that are negative, NaN, Inf or null (",
        "first data pass",
        negative_weight_column,
    ),
    (
        "Sample weights for an engine without them",
        "ConfigurationError",
        "Backend 'elephas' cannot train with sample or class weights.",
        BEFORE_JOBS,
        lambda spark: SparkTrainer(small_model(), backend="elephas", spark=spark).fit(
            *make_blobs(100), sample_weight=np.ones(100)
        ),
    ),
    (
        "NaN in NumPy input",
        "DataError",
        "1 row(s) with NaN, Inf or null features or labels",
        BEFORE_JOBS,
        nan_numpy,
    ),
    (
        "One-hot labels of the wrong width",
        "DataError",
        "should be class indices or one-hot vectors of width 4 (the model's output). Received: "
        "labels of shape (100, 5).",
        BEFORE_JOBS,
        lambda spark: trainer(spark).fit((make_blobs(100)[0], np.eye(5)[make_blobs(100)[1]])),
    ),
    (
        "Fewer rows than workers",
        "DataError",
        "The training data has 1 row(s) for 2 workers; each worker needs at least one.",
        BEFORE_JOBS,
        lambda spark: trainer(spark).fit(make_blobs(1)),
    ),
    (
        "No rows at all",
        "DataError",
        "The training features hold no samples",
        BEFORE_JOBS,
        empty_partition_only,
    ),
    (
        "Validation data that does not fit the model",
        "DataError",
        "Each sample in the validation features must have 16 values",
        BEFORE_JOBS,
        validation_of_wrong_size,
    ),
    (
        "Input that is not data",
        "TypeError",
        "Expected training data as a Spark DataFrame, a Parquet path, an RDD of (features, "
        "label) or a NumPy pair (x, y). Received: dict.",
        BEFORE_JOBS,
        lambda spark: trainer(spark).fit({"x": 1}),
    ),
    (
        "Uncompiled model",
        "ConfigurationError",
        "The model is not compiled. Call `model.compile(optimizer=..., loss=...)` first.",
        BEFORE_JOBS,
        uncompiled,
    ),
    (
        "A model with two inputs given one feature array",
        "DataError",
        "The model has 2 inputs",
        BEFORE_JOBS,
        two_input_model,
    ),
    (
        "Unknown engine",
        "ConfigurationError",
        "Unknown backend 'nope'. Installed backends:",
        BEFORE_JOBS,
        lambda spark: SparkTrainer(small_model(), backend="nope"),
    ),
    (
        "Unknown engine option",
        "ConfigurationError",
        "Unknown option(s) ['windw'] for backend 'async'. Valid options:",
        BEFORE_JOBS,
        lambda spark: SparkTrainer(small_model(), backend="async", backend_options={"windw": 3}),
    ),
    (
        "More workers than task slots",
        "ConfigurationError",
        "`num_workers=3` needs 3 task slots at once (training runs as one barrier stage), but "
        "master 'local[2]' offers 2.",
        BEFORE_JOBS,
        lambda spark: SparkTrainer(small_model(), num_workers=3, spark=spark, verbose=0).fit(
            make_blobs(100)
        ),
    ),
    (
        "num_workers below 1",
        "ConfigurationError",
        "Expected `num_workers` to be a positive integer. Received: num_workers=0.",
        BEFORE_JOBS,
        lambda spark: SparkTrainer(small_model(), num_workers=0),
    ),
    (
        "A negative seed",
        "ConfigurationError",
        "Expected `seed` to be None or an integer >= 0. Received: seed=-1.",
        BEFORE_JOBS,
        lambda spark: SparkTrainer(small_model(), seed=-1),
    ),
    (
        "KerasEstimator without a model",
        "ConfigurationError",
        "KerasEstimator has no model: pass `model=` (a compiled keras.Model) or call `setModel`.",
        BEFORE_JOBS,
        lambda spark: KerasEstimator().fit(
            spark.createDataFrame([([0.0], 0)], ["features", "label"])
        ),
    ),
    (
        "KerasEstimator `learningRate` over a LearningRateSchedule",
        "ConfigurationError",
        "The model's optimizer follows a LearningRateSchedule, so `learningRate` cannot replace "
        "its rate.",
        BEFORE_JOBS,
        scheduled_rate_tuned,
    ),
    (
        "`lr_scale` over a LearningRateSchedule",
        "ConfigurationError",
        "`lr_scale` multiplies a fixed learning rate, and this model's optimizer computes it "
        "with a LearningRateSchedule.",
        BEFORE_JOBS,
        scaled_schedule,
    ),
    (
        "An unknown `lr_scale`",
        "ConfigurationError",
        "Expected `lr_scale` to be a number > 0 or one of ('linear', 'sqrt'). "
        "Received: lr_scale='cubic'.",
        BEFORE_JOBS,
        lambda spark: SparkTrainer(
            small_model(), backend="sync", backend_options={"lr_scale": "cubic"}
        ),
    ),
    (
        "Outer momentum of 1 or more",
        "ConfigurationError",
        "Expected 0 <= outer_momentum < 1. Received: outer_momentum=1.0.",
        BEFORE_JOBS,
        lambda spark: SparkTrainer(
            small_model(), backend="sync", backend_options={"outer_momentum": 1.0}
        ),
    ),
    (
        "No Java on the machine",
        "SparkEnvironmentError",
        "Java was not found (JAVA_HOME is unset and `java` is not on PATH). PySpark 4 needs Java "
        "17 or newer",
        BEFORE_JOBS,
        missing_java,
    ),
    (
        "Cleartext weights beside an encrypted cluster",
        "ConfigurationError",
        "the parameter server at 10.0.0.5 sends weights in cleartext HTTP. Set "
        "`spark.kerasonspark.allowCleartextWeights=true` to accept that",
        BEFORE_JOBS,
        encrypted_cluster,
    ),
    (
        "A backup from another model",
        "ConfigurationError",
        "The backup was taken with another model architecture (fingerprint): 'a1b2', this run has "
        "'c3d4'.",
        BEFORE_JOBS,
        mismatched_backup,
    ),
    (
        "Request without the run's signature",
        "HTTP 401",
        "Missing `X-KOS-Auth` header: every request must be signed with the run's secret.",
        "by the server",
        lambda spark: Server().send(b"GET /v1/weights HTTP/1.1\r\n\r\n"),
    ),
    (
        "Request signed with another secret",
        "HTTP 401",
        "Bad signature: the request was not signed with this run's secret.",
        "by the server",
        foreign_signature,
    ),
    (
        "Replayed request",
        "HTTP 409",
        "Replayed or out-of-order request from worker 0: seq 5 is not above 5.",
        "by the server",
        replayed,
    ),
    (
        "Update of the wrong shapes",
        "HTTP 400",
        "Update shapes do not match the model: expected 1 arrays with shapes [(8,)]. Received: "
        "[(6,)].",
        "by the server",
        lambda spark: (
            lambda s: s.send(
                s.signed("POST", "/v1/push", push_body(np.zeros(6, np.float32), [(6,)]))
            )
        )(Server()),
    ),
    (
        "Update holding NaN or Inf",
        "HTTP 422",
        "Update holds 8 NaN or Inf values; it was refused and the center weights are unchanged.",
        "by the server",
        lambda spark: (
            lambda s: s.send(
                s.signed("POST", "/v1/push", push_body(np.full(8, np.nan, np.float32)))
            )
        )(Server()),
    ),
    (
        "Finite update whose result overflows float32",
        "HTTP 422",
        "The update is finite, but the weights times their 2 samples would overflow float32",
        "by the server",
        lambda spark: (
            lambda s: s.send(
                s.signed("POST", "/v1/rounds/0", push_body(np.full(8, 3e38, np.float32), samples=2))
            )
        )(Server()),
    ),
    (
        "Payload over the cap (signed)",
        "HTTP 413",
        "Payload of 9999 bytes exceeds the cap of 4096 bytes; raise `max_payload_bytes` if the "
        "model is that large.",
        "by the server",
        lambda spark: (lambda s: s.send(s.signed("POST", "/v1/push", b"", length=9999)))(Server()),
    ),
    (
        "Malformed Content-Length",
        "HTTP 400",
        "Content-Length must be a non-negative integer of at most 18 ASCII digits.",
        "by the server",
        lambda spark: Server().send(b"POST /v1/push HTTP/1.1\r\nContent-Length: +5\r\n\r\n12345"),
    ),
    (
        "Request head not complete within header_timeout",
        "HTTP 408",
        "The request line and headers did not arrive within 0.5 s (`header_timeout`); the "
        "connection is closed.",
        "by the server",
        lambda spark: Server(header_timeout=0.5).send(b"GET /v1/health HTTP/1.1\r\nX-Slow: 1"),
    ),
]


def run(scenario: Scenario, spark) -> tuple[str, str]:
    """The scenario's result as ("ExceptionName" or "HTTP n", message)."""
    try:
        outcome = scenario(spark)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    assert isinstance(outcome, tuple), "the scenario raised nothing"
    status, body = outcome
    return f"HTTP {status}", body


def spark_jobs(spark) -> set[int]:
    tracker = spark.sparkContext.statusTracker()
    return {j for group in (None, "kerasonspark") for j in tracker.getJobIdsForGroup(group)}


@pytest.mark.parametrize(
    "bad_input, result, excerpt, when, scenario", CATALOGUE, ids=[row[0] for row in CATALOGUE]
)
def test_each_bad_input_gets_its_documented_error(
    spark, bad_input, result, excerpt, when, scenario
):
    jobs_before = spark_jobs(spark)
    got, message = run(scenario, spark)
    assert got == result, message
    assert excerpt in message
    if when == BEFORE_JOBS:
        assert spark_jobs(spark) == jobs_before, "a Spark job ran before the refusal"


def documented_rows() -> list[tuple[str, str, str, str]]:
    text = CATALOGUE_PAGE.read_text()
    after = text.split("<!-- bad-input catalogue -->", 1)[1].strip().splitlines()
    table = [line for line in itertools.takewhile(lambda line: line.startswith("|"), after)]
    rows = []
    for line in table[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        rows.append(
            (
                cells[0],
                cells[1].strip("`"),
                cells[2].strip("`").strip().replace("\\|", "|"),
                cells[3],
            )
        )
    return rows


def test_the_documented_catalogue_is_this_table():
    assert documented_rows() == [row[:4] for row in CATALOGUE]
    assert len(CATALOGUE) >= 20
