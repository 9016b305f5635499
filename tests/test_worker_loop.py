"""The worker loop, result assembly and sync scheduling, isolated or in-process (seconds, no
Spark)."""

import threading

import numpy as np
import pytest

from kerasonspark import ConfigurationError, WorkerError, WorkerReport
from kerasonspark._data import DataInfo
from kerasonspark._driver import merge_history
from kerasonspark._executor import WorkerSettings, train_worker, validation_share
from kerasonspark.engine import Exchange, even_runs
from kerasonspark.testing import fit_in_process

from conftest import make_blobs, small_model

INFO = DataInfo((3,), "sparse", 2)


class FakeModel:
    """Stands in for a Keras model where the loop only resets metrics and evaluates."""

    def __init__(self):
        self.resets, self.evaluated, self.evaluate_options = 0, [], []

    def reset_metrics(self):
        self.resets += 1

    def evaluate(self, x, y, **kwargs):
        self.evaluated.append(len(x))
        self.evaluate_options.append(kwargs)
        # not a scalar: left out
        return {
            "loss": 0.5,
            "accuracy": float(len(x)),
            "per_class": np.ones(3),
        }


class FakeSteps:
    """Records which rows each run of steps trained on, in which batch size, from which arrays."""

    def __init__(self):
        self.model, self.runs, self.arrays = FakeModel(), [], set()

    def run(self, x, y, index, batch_size, weights=None, max_rows=None):
        self.runs.append((index.copy(), batch_size))
        self.arrays.add((id(x), id(y)))

    def metrics(self):
        return {"loss": float(len(self.runs))}


class Recording(Exchange):
    def __init__(self, runs_per_epoch=None, bad_schedule=False):
        self.runs_per_epoch, self.bad_schedule = runs_per_epoch, bad_schedule
        self.events, self.models, self.epochs = [], set(), []

    def start(self, model, worker):
        self.models.add(id(model))
        self.events.append(("start", worker))

    def schedule(self, steps, epoch):
        self.epochs.append(epoch)
        if self.bad_schedule:
            return [steps + 1]
        if self.runs_per_epoch is None:
            return [steps]
        base, extra = divmod(steps, self.runs_per_epoch)
        return [base + 1] * extra + [base] * (self.runs_per_epoch - extra)

    def exchange(self, model, samples):
        self.models.add(id(model))
        self.events.append(("exchange", samples))

    def end_epoch(self, model, epoch):
        self.models.add(id(model))
        self.events.append(("end_epoch", epoch))

    def finish(self, model):
        self.models.add(id(model))
        return {"figure": 7}


def settings(epochs=2, batch=4, workers=2, seed=3):
    return WorkerSettings("run", epochs, batch, workers, seed, INFO)


def loop(n=10, exchange=None, validation=None, worker=0, **kw):
    x, y = np.zeros((n, 3), np.float32), np.zeros(n, np.int32)
    steps, exchange = FakeSteps(), exchange or Recording(runs_per_epoch=2)
    report = train_worker(worker, steps, x, y, settings(**kw), exchange, validation)
    if n:
        assert steps.arrays == {(id(x), id(y))}  # every run trains on the worker's own arrays
    assert exchange.models == {id(steps.model)}  # every hook sees the worker's model
    return report, steps, exchange


def test_every_epoch_visits_every_row_once_in_a_fresh_order():
    report, steps, _ = loop(n=10, epochs=3, batch=4)
    per_epoch = [np.concatenate([i for i, _ in steps.runs[e * 2 : (e + 1) * 2]]) for e in range(3)]
    for order in per_epoch:
        assert sorted(order) == list(range(10))
    assert not np.array_equal(per_epoch[0], per_epoch[1])
    assert all(batch == 4 for _, batch in steps.runs)
    # 10 rows at batch 4 = 3 steps an epoch, cut into runs of 2 and 1 steps
    assert [len(i) for i, _ in steps.runs[:2]] == [8, 2]
    assert (report.samples, report.steps) == (10, 9)


def test_shuffling_is_seeded_per_worker():
    # Worker w shuffles with seed + w, one fresh permutation per epoch.
    runs = [i for i, _ in loop(seed=5, worker=1, epochs=2)[1].runs]
    rng = np.random.default_rng(6)
    assert np.array_equal(np.concatenate(runs[:2]), rng.permutation(10))
    assert np.array_equal(np.concatenate(runs[2:]), rng.permutation(10))
    unseeded = [np.concatenate([i for i, _ in loop(seed=None)[1].runs]) for _ in range(3)]
    assert not all(np.array_equal(unseeded[0], other) for other in unseeded[1:])


def test_exchanges_follow_every_run_and_epochs_end_in_order():
    report, _, exchange = loop(n=10, epochs=2, batch=4)
    assert exchange.epochs == [0, 1]
    assert 0 <= report.seconds < 5 and report.val_samples == 0 and report.val_history == []
    assert exchange.events == [
        ("start", 0),
        ("exchange", 8),
        ("exchange", 2),
        ("end_epoch", 0),
        ("exchange", 8),
        ("exchange", 2),
        ("end_epoch", 1),
    ]
    # the exchange's own figures, beside the worker's peak memory
    assert report.figures == {"figure": 7, "peak_rss_mb": report.figures["peak_rss_mb"]}
    assert report.figures["peak_rss_mb"] > 0 and report.worker == 0


def test_metrics_are_read_and_reset_once_per_epoch():
    report, steps, _ = loop(epochs=3)
    assert steps.model.resets == 3
    # running runs count at each epoch's end
    assert report.history == [
        {"loss": 2.0},
        {"loss": 4.0},
        {"loss": 6.0},
    ]


def test_an_empty_partition_still_joins_every_exchange():
    report, steps, exchange = loop(n=0, epochs=2)
    assert steps.runs == [] and report.history == [{}, {}]
    assert [e for e in exchange.events if e[0] == "exchange"] == [("exchange", 0)] * 4


def test_validation_share_is_scored_after_every_epoch():
    vx, vy = np.zeros((9, 3), np.float32), np.arange(9) % 2
    share = validation_share((vx, vy), 1, settings(workers=2))
    # rows 1, 3, 5, 7, labels as the loss takes them
    assert len(share[0]) == 4 and share[1].dtype == np.int32
    report, steps, _ = loop(epochs=2, validation=share, worker=1)
    assert steps.model.evaluated == [4, 4] and report.val_samples == 4
    assert (
        steps.model.evaluate_options == [{"batch_size": 256, "verbose": 0, "return_dict": True}] * 2
    )
    assert report.val_history == [{"loss": 0.5, "accuracy": 4.0}] * 2
    assert validation_share(None, 0, settings()) is None


def test_a_schedule_that_does_not_cover_the_epoch_fails_at_once():
    with pytest.raises(
        RuntimeError,
        match="^The exchange scheduled 4 steps for an epoch of 3; "
        "`Exchange.schedule` must return runs that add up to `steps`.$",
    ):
        loop(exchange=Recording(bad_schedule=True))


def test_history_is_weighted_by_samples_and_validation_rows():
    reports = [
        WorkerReport(
            0,
            30,
            3,
            1.0,
            history=[{"loss": 1.0}, {"loss": 0.5}],
            val_samples=10,
            val_history=[{"loss": 2.0}] * 2,
        ),
        WorkerReport(
            1,
            10,
            1,
            1.0,
            history=[{"loss": 3.0}, {"loss": 1.5}],
            val_samples=30,
            val_history=[{"loss": 4.0}] * 2,
        ),
        WorkerReport(2, 0, 0, 1.0, history=[{}, {}]),  # an empty partition counts for nothing
    ]
    history = merge_history(reports, 2)
    assert history == {"loss": [1.5, 0.75], "val_loss": [3.5, 3.5]}
    assert merge_history([], 2) == {}
    # one worker of one sample; a worker that reported fewer epochs counts only where it has them
    lone = WorkerReport(0, 1, 1, 1.0, history=[{"loss": 2.0, "accuracy": 0.5}])
    assert merge_history([lone], 1) == {"loss": [2.0], "accuracy": [0.5]}
    short = WorkerReport(1, 3, 1, 1.0, history=[{"loss": 4.0, "accuracy": 1.0}])
    longer = WorkerReport(
        0, 1, 2, 1.0, history=[{"loss": 0.0, "accuracy": 0.0}, {"loss": 1.0, "accuracy": 1.0}]
    )
    assert merge_history([longer, short], 2) == {"loss": [3.0, 1.0], "accuracy": [0.75, 1.0]}


def test_result_assembly_sets_the_weights_and_fills_the_common_stats():
    from kerasonspark._driver import assemble_result
    from kerasonspark._serialization import ModelSpec
    from kerasonspark.engine import TrainingConfig, TrainingJob, get_flat_weights

    model = small_model()
    spec = ModelSpec.from_model(model)
    job = TrainingJob(
        spec=spec,
        model=model,
        info=DataInfo((16,), "sparse", 4),
        runner=None,
        config=TrainingConfig(epochs=2, num_workers=2),
        run_id="r",
        partition_sizes=[30, 10],
    )
    reports = [
        WorkerReport(1, 10, 2, 1.0, history=[{"loss": 3.0}] * 2, figures={"pushes": 3}),
        WorkerReport(0, 30, 4, 2.0, history=[{"loss": 1.0}] * 2, figures={"pushes": 5}),
    ]
    weights = np.full(spec.weights.size, 0.5, np.float32)
    result = assemble_result(
        job, "mine", reports, weights, 4.0, 8, {"rule": "adag"}, {"updates": 8}
    )
    assert result.model is model and np.all(get_flat_weights(model) == 0.5)
    assert result.history == {"loss": [1.5, 1.5]}
    stats = result.stats
    assert {
        k: stats[k]
        for k in (
            "backend",
            "samples",
            "epochs",
            "num_workers",
            "train_seconds",
            "samples_per_second",
            "exchanges",
        )
    } == {
        "backend": "mine",
        "samples": 80,
        "epochs": 2,
        "num_workers": 2,
        "train_seconds": 4.0,
        "samples_per_second": 20.0,
        "exchanges": 8,
    }
    assert [w["worker"] for w in stats["workers"]] == [0, 1] and stats["workers"][0]["pushes"] == 5
    assert stats["mine"] == {"rule": "adag"} and stats["parameter_server"] == {"updates": 8}
    unserved = assemble_result(job, "plain", reports, weights, 0.0, 0, None).stats
    assert (
        unserved["samples_per_second"] == 0.0
        and unserved["plain"] == {}
        and "parameter_server" not in unserved
    )
    assert (
        assemble_result(job, "quick", reports, weights, 0.5, 0, None).stats["samples_per_second"]
        == 160.0
    )


def test_a_job_hands_every_call_to_its_runner():
    from kerasonspark.engine import StageOutcome, TrainingConfig, TrainingJob

    calls = []
    served = StageOutcome(["report"], 1.5, {"rounds": 6, "updates": 0})

    class Runner:
        def run_workers(self, job, exchange):
            calls.append(("run_workers", exchange))
            return ["report"]

        def serve(self, job, store, make_exchange):
            calls.append(("serve", store, make_exchange))
            return served

        def result(self, job, reports, weights, seconds, exchanges, engine_stats, server_stats):
            calls.append(
                (
                    "result",
                    job is the_job,
                    reports,
                    weights,
                    seconds,
                    exchanges,
                    engine_stats,
                    server_stats,
                )
            )
            return "result"

        def local_arrays(self, job):
            calls.append(("local_arrays",))
            return "x", np.array([0, 1, 1]), np.ones(3, np.float32)

    job = the_job = TrainingJob(
        spec=None,
        model=None,
        info=INFO,
        config=TrainingConfig(class_weight=(0.5, 2.0)),
        runner=Runner(),
        run_id="r",
        partition_sizes=[3, 4],
    )
    assert job.num_samples == 7
    with pytest.raises(ConfigurationError, match="Pass `exchanges=`"):
        job.result(["r"], "w", 2.0)  # not served yet: no server count to default to
    assert job.run_workers("ex") == ["report"] and job.serve("store", "make") is served
    # exchanges: the server's count
    assert job.result(["r"], "w", 2.0, engine_stats={"a": 1}) == "result"
    assert job.result(["r"], "w", 2.0, exchanges=5) == "result"
    with pytest.raises(
        ConfigurationError, match=r"job.local_arrays\(\) is for engines with `trains_on = 'driver'`"
    ):
        job.local_arrays()
    on_driver = TrainingJob(
        spec=None,
        model=None,
        info=INFO,
        config=TrainingConfig(class_weight=(0.5, 2.0)),
        runner=Runner(),
        run_id="r",
        partition_sizes=[3, 4],
        trains_on="driver",
    )
    x, y, weights = on_driver.local_arrays()
    # the class weights folded into the sample weights
    assert x == "x" and weights.tolist() == [
        0.5,
        2.0,
        2.0,
    ]
    with pytest.raises(ConfigurationError, match="trains_on = 'workers'"):
        on_driver.serve("store", "make")
    server = {"rounds": 6, "updates": 0}
    assert calls == [
        ("run_workers", "ex"),
        ("serve", "store", "make"),
        ("result", True, ["r"], "w", 2.0, 6, {"a": 1}, server),
        ("result", True, ["r"], "w", 2.0, 5, None, server),
        ("local_arrays",),
    ]


def test_worker_report_figures_for_stats():
    report = WorkerReport(3, 100, 10, 2.0, history=[{}, {}], figures={"pushes": 4})
    assert report.samples_per_second == 100.0
    assert report.as_stats() == {
        "worker": 3,
        "samples": 100,
        "steps": 10,
        "seconds": 2.0,
        "samples_per_second": 100.0,
        "pushes": 4,
    }


def test_sync_cuts_every_epoch_into_the_same_rounds():
    from kerasonspark.backends.sync import SyncExchange

    schedule = SyncExchange("http://127.0.0.1:1", b"k" * 32, rounds_per_epoch=3, timeout=1).schedule
    assert schedule(10, 0) == [4, 3, 3] == even_runs(10, 3)
    assert schedule(2, 5) == [1, 1, 0]  # a small partition still meets every round
    assert even_runs(0, 2) == [0, 0]
    for steps in range(0, 40):
        assert len(even_runs(steps, 4)) == 4 and sum(even_runs(steps, 4)) == steps
        assert max(even_runs(steps, 4)) - min(even_runs(steps, 4)) <= 1


# -- the real engines, in-process ------------------------------------------------------------------
# One run per option that changes what travels or how it is applied; the rules' arithmetic is in
# test_rules.py (downpour also trains on Spark in test_cli.py's comparison).
@pytest.mark.inprocess
@pytest.mark.parametrize(
    "backend, options",
    [
        ("sync", {"sync_every": 8}),
        ("async", {"rule": "adag", "window": 4}),
        ("async", {"rule": "dynsgd", "window": 4}),
        ("async", {"rule": "easgd", "window": 4, "alpha": 0.5}),
        ("async", {"rule": "adag", "window": 4, "delta_dtype": "bfloat16"}),
        ("async", {"rule": "adag", "window": 4, "overlap": True}),
        ("async", {"rule": "sasgd", "window": 4, "lr_scale": "sqrt", "warmup_steps": 8}),
        ("sync", {"sync_every": 8, "lr_scale": "linear", "warmup_steps": 8, "outer_momentum": 0.5}),
        ("hogwild", {"window": 4}),
        ("single", None),
    ],
)
def test_engines_learn_and_count_their_exchanges_in_process(backend, options):
    x, y = make_blobs(1000)
    result = fit_in_process(
        backend,
        small_model(),
        x,
        y,
        epochs=2,
        batch_size=16,
        seed=0,
        backend_options=options,
        validation_data=make_blobs(200, seed=0),
    )
    assert result.history["val_accuracy"][-1] > 0.9
    stats = result.stats
    assert [w["samples"] for w in stats["workers"]] == (
        [500, 500] if backend != "single" else [1000]
    )
    steps = [-(-w["samples"] // 16) for w in stats["workers"]]  # 32 steps an epoch each
    if backend == "sync":
        assert stats["exchanges"] == 2 * 4 and stats["sync"]["rounds_per_epoch"] == 4
        assert [w["rounds"] for w in stats["workers"]] == [8, 8]
    elif backend == "single":
        assert stats["exchanges"] == 0 and "parameter_server" not in stats
    else:
        expected = sum(2 * -(-s // options["window"]) for s in steps)
        assert stats["exchanges"] == expected == sum(w["pushes"] for w in stats["workers"])
        assert stats["parameter_server"]["refused_total"] == 0
        histogram = {
            int(k): v for k, v in stats["parameter_server"]["staleness"]["histogram"].items()
        }
        assert (
            sum(histogram.values()) == expected
            and sum(k * v for k, v in histogram.items()) <= expected
        )


@pytest.mark.inprocess
def test_a_failing_worker_names_itself_in_process_and_leaves_no_thread():
    from kerasonspark.backends.sync import SyncEngine

    class DiskFull(Exchange):
        """Worker 1's exchange fails at round 2; everything else is the sync engine's own."""

        def __init__(self, inner):
            self.inner = inner

        def start(self, model, worker):
            self.inner.start(model, worker)

        def schedule(self, steps, epoch):
            return self.inner.schedule(steps, epoch)

        def exchange(self, model, samples):
            if self.inner.worker == 1 and self.inner.round == 2:
                raise ValueError("disk full")
            self.inner.exchange(model, samples)

        def report_failure(self, message):
            self.inner.report_failure(message)

        def close(self):
            self.inner.close()

    class Failing(SyncEngine):
        def run(self, job):
            serve = job.serve
            job.serve = lambda store, make_exchange: serve(
                store, lambda url, secret: DiskFull(make_exchange(url, secret))
            )
            return super().run(job)

    x, y = make_blobs(400)
    with pytest.raises(WorkerError, match="Worker 1 failed: ValueError: disk full") as failed:
        fit_in_process(
            Failing(sync_every=2, barrier_timeout=60), small_model(), x, y, epochs=2, batch_size=16
        )
    assert failed.value.worker == 1
    assert not [
        t.name
        for t in threading.enumerate()
        if t.name.startswith(("kerasonspark-ps", "kerasonspark-worker"))
    ]


class FakeOptimizer:
    learning_rate = 0.01


def test_learning_rate_scaling_ramps_up_over_the_warm_up_and_multiplies_the_optimizers_rate():
    from kerasonspark.engine import LearningRateScaling

    steps = FakeSteps()
    steps.model.optimizer = FakeOptimizer()
    rates = []
    steps.run = lambda *a, **k: rates.append(steps.model.optimizer.learning_rate)
    exchange = Recording(runs_per_epoch=3)  # 12 rows at batch 2: 6 steps an epoch in runs of 2
    exchange.lr_scaling = LearningRateScaling(factor=4.0, warmup_steps=4)
    x, y = np.zeros((12, 3), np.float32), np.zeros(12, np.int32)
    train_worker(0, steps, x, y, settings(epochs=2, batch=2), exchange, None)
    # runs start after 0, 2, 4, 6, 8, 10 local steps: multipliers 1, 2.5, then 4 from the warm-up's
    # end on
    np.testing.assert_allclose(rates, [0.01, 0.025, 0.04, 0.04, 0.04, 0.04])
    assert LearningRateScaling(2.0).multiplier(0) == 2.0  # no warm-up: the full factor at once
