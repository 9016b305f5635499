"""Compressed deltas with error feedback: the selection rule, the server's sparse push route over
a real socket, and training with the asynchronous engines on real Spark."""

import json

import numpy as np
import pytest

from kerasonspark import ParameterServerError, SparkTrainer
from kerasonspark._asynchronous import AsyncOptions, ErrorFeedback
from kerasonspark._serialization import get_flat_weights
from kerasonspark.parameter_server import (
    ParameterClient,
    ParameterServer,
    ParameterStore,
    ServerConfig,
    UpdateRule,
    make_rule,
    new_secret,
    wire,
)

from conftest import make_blobs, small_model

SHAPES = [(3, 2), (2,)]


def test_error_feedback_sends_the_largest_and_keeps_the_rest_until_it_is_sent():
    feedback = ErrorFeedback(0.25, 8)
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=8).astype(np.float32) for _ in range(5)]
    sent = np.zeros(8, np.float32)
    for delta in deltas:
        held = feedback.residual + delta
        positions, values = feedback.select(delta)
        assert len(positions) == 2 and positions.dtype == np.uint32
        assert list(positions) == sorted(positions)
        # the two of largest magnitude, and nothing else, left
        assert np.abs(values).min() >= np.abs(np.delete(held, positions)).max()
        sent[positions] += values
        assert not feedback.residual[positions].any()
    # nothing lost: what was sent plus what is held back is every delta
    np.testing.assert_allclose(sent + feedback.residual, np.sum(deltas, axis=0), rtol=1e-6)


def test_delta_fraction_is_checked_before_any_work():
    with pytest.raises(ValueError, match=r"delta_fraction` in \(0, 1\]"):
        AsyncOptions(delta_fraction=0.0)
    with pytest.raises(ValueError, match="delta rule"):
        AsyncOptions(delta_fraction=0.1, rule="easgd")
    with pytest.raises(ValueError, match="center='driver'"):
        AsyncOptions(delta_fraction=0.1, center="sharded")


@pytest.fixture
def serve(no_leaked_threads):
    servers = []

    def start(rule="downpour"):
        secret = new_secret()
        store = ParameterStore(
            np.arange(8, dtype=np.float32), SHAPES, num_workers=2, rule=make_rule(rule)
        )
        server = ParameterServer(store, ServerConfig(secret, max_payload_bytes=4096)).start()
        servers.append(server)
        return store, ParameterClient(server.url, secret, 0, timeout=30)

    yield start
    for server in servers:
        server.stop()


def test_a_sparse_push_moves_only_its_positions(serve):
    store, client = serve()
    with client:
        client.pull()
        reply, header = client.push(
            np.array([10.0, -1.0], np.float32), SHAPES, 1, 4, indices=np.array([2, 7], np.uint32)
        )
    expected = np.arange(8, dtype=np.float32)
    expected[[2, 7]] += [10.0, -1.0]
    np.testing.assert_array_equal(reply, expected)
    np.testing.assert_array_equal(store.center, expected)
    assert header["version"] == 1 and store.worker_samples[0] == 4


def _raw_push(client, body: bytes):
    return client.request("POST", "/v1/push", body)


@pytest.mark.parametrize(
    "values, positions, status, fragment",
    [
        (np.array([np.nan], np.float32), [3], 422, "NaN"),
        (np.array([1.0, 1.0], np.float32), [5, 8], 400, "below"),  # 8 is past the 8 elements
        (np.array([1.0, 1.0], np.float32), [5, 2], 400, "ascending"),
    ],
)
def test_a_bad_sparse_push_gets_its_status_and_changes_nothing(
    serve, values, positions, status, fragment
):
    store, client = serve()
    body = b"".join(
        bytes(p)
        for p in wire.encode_sparse(values, SHAPES, np.array([0, 1][: len(values)], np.uint32))
    )
    # the positions written as given, past the encoder's own ordering
    header_len = int.from_bytes(body[8:12], "little")
    start = 12 + header_len + (-(12 + header_len) % 8)
    raw = np.array(positions, "<u4").tobytes()
    body = body[:start] + raw + body[start + len(raw) :]
    with client:
        answer, _, data = _raw_push(client, body)
    assert answer == status and fragment in json.loads(data)["error"]
    np.testing.assert_array_equal(store.center, np.arange(8))


def test_sparse_pushes_are_refused_by_a_weights_rule_and_by_the_round_barrier(serve):
    store, client = serve("easgd")
    with client, pytest.raises(ParameterServerError, match="whole weights") as refused:
        client.pull()
        client.push(np.ones(1, np.float32), SHAPES, 1, 1, indices=np.array([0], np.uint32))
    assert refused.value.status == 400 and store.counters["refused_sparse"] == 1
    body = b"".join(
        bytes(p)
        for p in wire.encode_sparse(
            np.ones(1, np.float32), SHAPES, np.array([0], np.uint32), samples=1
        )
    )
    with client:
        status, _, data = client.request("POST", "/v1/rounds/0", body)
    assert status == 400 and "sparse message" in json.loads(data)["error"]
    np.testing.assert_array_equal(store.center, np.arange(8))


def train(spark, backend, model, x, y, validation, epochs, **options):
    """``fit`` with 2 workers, batch 16 and a window of 4; checks that the weights moved."""
    before = get_flat_weights(model)
    result = SparkTrainer(
        model,
        backend=backend,
        num_workers=2,
        epochs=epochs,
        batch_size=16,
        spark=spark,
        seed=1,
        verbose=0,
        backend_options={"window": 4, **options},
    ).fit(x, y, validation_data=validation)
    assert not np.allclose(get_flat_weights(model), before)
    return result


@pytest.mark.spark
@pytest.mark.parametrize("backend", ["async", "hogwild"])
def test_compressed_deltas_train_and_send_a_fraction_of_the_bytes(spark, backend):
    data, labels = make_blobs(1300)
    (x, y), validation = (data[:1000], labels[:1000]), (data[1000:], labels[1000:])

    def fit(**options):
        result = train(spark, backend, small_model(), x, y, validation, 2, **options)
        return result, sum(w["mb_sent"] for w in result.stats["workers"])

    whole, whole_sent = fit()
    compressed, compressed_sent = fit(delta_fraction=0.05)
    assert compressed.history["val_accuracy"][-1] > 0.9
    # 16 pushes a worker, each 34 of the 676 elements as 8-byte position-value pairs instead of 4
    # bytes each, plus each epoch's held-back remainder, pushed whole once: about 0.27 of the bytes
    assert compressed_sent < 0.35 * whole_sent
    assert compressed.stats["parameter_server"]["updates"] == whole.stats["exchanges"] + 4


@pytest.mark.parametrize("rule", ["downpour", "adag", "dynsgd", "sasgd"])
@pytest.mark.parametrize("lock", [True, False], ids=["locked", "hogwild"])
def test_a_sparse_push_lands_exactly_as_its_whole_delta_would(rule, lock):
    rng = np.random.default_rng(0)
    start = rng.normal(size=12).astype(np.float32)
    positions = np.array([1, 4, 8, 11], np.uint32)
    values = rng.normal(size=4).astype(np.float32)
    centers = []
    for sparse in (True, False):
        # elements 8 and 9 are moving statistics: added as pushed, past the rule
        store = ParameterStore(
            start.copy(), [(12,)], 2, rule=make_rule(rule), lock=lock, state=[(8, 10)]
        )
        store.pull(0)
        store.push(1, np.full(12, 0.25, np.float32), window=4, samples=1)  # worker 0 is now stale
        if sparse:
            reply, version, staleness = store.push(0, values, 4, 1, positions)
        else:
            reply, version, staleness = store.push(0, wire.to_dense(positions, values, 12), 4, 1)
        assert (version, staleness) == (2, 1)
        np.testing.assert_array_equal(reply, store.center)
        centers.append(store.center.copy())
    np.testing.assert_array_equal(centers[0], centers[1])
    assert centers[0][8] == np.float32(start[8] + 0.25) + values[2]


def test_the_store_knows_what_changed_since_a_version_until_the_whole_center_changes():
    store = ParameterStore(
        np.zeros(10, np.float32), [(10,)], num_workers=2, rule=make_rule("downpour")
    )
    assert store.changed_since(0, most=10) is None  # nothing pushed sparsely: no marks yet
    for worker, positions in ((0, [1, 2]), (1, [2, 7]), (0, [9])):
        store.push(
            worker, np.ones(len(positions), np.float32), 1, 1, np.array(positions, np.uint32)
        )
    assert list(store.changed_since(0, most=10)) == [1, 2, 7, 9]
    assert list(store.changed_since(2, most=10)) == [9]
    assert list(store.changed_since(3, most=10)) == []
    assert store.changed_since(0, most=3) is None  # more than asked for: the whole center
    store.push(1, np.ones(10, np.float32), 1, 1)  # a whole push may change every element
    assert store.changed_since(3, most=10) is None and list(store.changed_since(4, most=10)) == []


def test_a_sparse_push_under_a_rule_of_its_own_counts_as_changing_everything():
    class Halfway(UpdateRule):  # moves every element, whatever the delta holds
        name = "halfway"

        def apply(self, center, update, staleness, window):
            new = (center + update) / 2
            return new, new

    store = ParameterStore(np.ones(10, np.float32), [(10,)], num_workers=2, rule=Halfway())
    reply, version, _ = store.push(
        0, np.full(2, 3.0, np.float32), 1, 1, np.array([1, 4], np.uint32)
    )
    np.testing.assert_array_equal(reply, [0.5, 2, 0.5, 0.5, 2, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert version == 1 and store.changed_since(0, most=10) is None  # the reply must be whole


def test_sparse_replies_bring_each_workers_copy_to_the_center(serve):
    store, first = serve()
    url = f"http://{first.host}:{first.port}"
    with first, ParameterClient(url, first.secret, 1, timeout=30) as second:
        copies, versions = {}, {}
        for worker, client in ((0, first), (1, second)):
            flat, versions[worker] = client.pull()
            copies[worker] = flat.copy()
        for worker, client, positions in (
            (0, first, [0, 3]),
            (1, second, [3, 6]),
            (0, first, [5]),
            (1, second, [1]),
        ):
            values = np.full(len(positions), 0.5 * (worker + 1), np.float32)
            reply, header = client.push(
                values, SHAPES, 1, 1, indices=np.array(positions, np.uint32), since=versions[worker]
            )
            assert "indices" in header  # a few elements changed: only those came back
            copies[worker][header["indices"]] = reply
            versions[worker] = header["version"]
            np.testing.assert_array_equal(copies[worker], store.center)
    # the second worker's last reply: what the first changed since its push, and its own
    assert list(header["indices"]) == [1, 5]


def token_sequences(n: int, vocab: int = 20_000, length: int = 8, seed: int = 0):
    """Sequences whose label (of 4) is the class most of their tokens stand for (token % 4), a
    few hundred tokens of each class frequent, as words are, and a quarter of the tokens noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    rank = np.minimum(rng.geometric(0.01, (n, length)), vocab // 4 - 1)
    tokens = rank * 4 + labels[:, None]
    noise = rng.random((n, length)) < 0.25
    tokens[noise] = rng.integers(0, vocab, int(noise.sum()))
    return tokens.astype(np.int32), labels.astype(np.int32)


def embedding_model(vocab: int = 20_000):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),  # token ids as floats, the way features travel; Embedding casts
            keras.layers.Embedding(vocab, 8),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model


@pytest.mark.spark
@pytest.mark.parametrize("backend", ["async", "hogwild"])
def test_an_embedding_model_exchanges_the_rows_it_changed(spark, backend):
    x, y = token_sequences(3000)
    model = embedding_model()
    before = get_flat_weights(model)
    result = train(spark, backend, model, x, y, token_sequences(500, seed=1), 3)
    assert result.history["val_accuracy"][-1] > 0.9
    # SGD moves only the rows the training sequences hold
    assert 0 < np.count_nonzero(get_flat_weights(model) - before) < model.count_params() / 2
    whole = model.count_params() * 4 / 1e6  # MB of one whole push or reply
    for worker in result.stats["workers"]:
        # a window's 64 sequences touch at most 512 of the 20,000 rows
        assert worker["mb_sent"] / worker["pushes"] < 0.2 * whole
        # the first pull and each epoch's first reply are whole (the copy is the epoch's center)
        assert worker["mb_received"] / worker["pushes"] < 0.3 * whole
        assert worker["peak_rss_mb"] > 100  # TensorFlow alone holds more
