import pytest

from kerasonspark import ConfigurationError, ResourceConfig, SparkTrainer, available_backends
from kerasonspark.engine import Engine, resolve_backend

from conftest import small_model


def test_engines_are_found_through_entry_points():
    engines = available_backends()
    assert {"sync", "single"} <= set(engines)
    assert all(issubclass(cls, Engine) for cls in engines.values())


def test_unknown_backend_lists_the_installed_ones():
    with pytest.raises(ConfigurationError, match="Installed backends: .*'single'.*'sync'"):
        resolve_backend("nope")


def test_unknown_or_bad_options_name_the_valid_ones():
    valid = (
        "Valid options: \\['sync_every', 'barrier_timeout', 'outer_lr', 'outer_momentum', "
        "'center', 'mirror_every', 'lr_scale', 'warmup_steps'\\]"
    )
    with pytest.raises(ConfigurationError, match=valid):
        resolve_backend("sync", {"sync_evry": 4})
    with pytest.raises(ConfigurationError, match="sync_every"):
        resolve_backend("sync", {"sync_every": 0})
    with pytest.raises(ConfigurationError, match="'auto', 'driver', 'sharded'.*center='ring'"):
        resolve_backend("sync", {"center": "ring"})
    with pytest.raises(ConfigurationError, match="mirror_every"):
        resolve_backend("sync", {"mirror_every": 0})


def test_an_engine_object_is_used_as_is():
    engine = available_backends()["sync"](sync_every=4)
    assert resolve_backend(engine) is engine
    with pytest.raises(ConfigurationError):
        resolve_backend(engine, {"sync_every": 2})


def test_trainer_validates_its_arguments():
    with pytest.raises(ConfigurationError, match="num_workers"):
        SparkTrainer(small_model(), num_workers=0)
    with pytest.raises(ConfigurationError, match="worker_threads"):
        ResourceConfig(worker_threads=-1)
    with pytest.raises(TypeError, match="keras.Model"):
        SparkTrainer("model")
    import keras

    uncompiled = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(ConfigurationError, match="compile"):
        SparkTrainer(uncompiled)


def test_missing_java_gets_a_clear_error(monkeypatch):
    from kerasonspark import SparkEnvironmentError
    from kerasonspark._session import require_java

    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SparkEnvironmentError, match="Java 17"):
        require_java()


def test_native_start_up_lines_are_held_unless_start_up_fails(capfd):
    import os

    from kerasonspark._executor import native_start_up_lines_held

    with native_start_up_lines_held():
        os.write(2, b"I0000 oneDNN custom operations are on\n")
    assert capfd.readouterr().err == ""
    with pytest.raises(ImportError):
        with native_start_up_lines_held():
            os.write(2, b"E0000 the reason it failed\n")
            raise ImportError("no tensorflow")
    assert "the reason it failed" in capfd.readouterr().err
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"  # stderr is back


def test_cleartext_weights_are_refused_beside_an_encrypted_cluster_unless_allowed():
    from kerasonspark._session import ALLOW_CLEARTEXT_WEIGHTS, check_weights_privacy

    encrypted = {"spark.network.crypto.enabled": "true"}
    with pytest.raises(ConfigurationError, match="cleartext") as refused:
        check_weights_privacy(encrypted, "10.0.0.5")
    assert ALLOW_CLEARTEXT_WEIGHTS in str(refused.value)
    with pytest.raises(ConfigurationError, match="spark.ssl.enabled"):
        check_weights_privacy({"spark.ssl.enabled": "TRUE"}, "10.0.0.5")
    check_weights_privacy(encrypted, "127.0.0.1")  # loopback never leaves the machine
    check_weights_privacy({**encrypted, ALLOW_CLEARTEXT_WEIGHTS: "true"}, "10.0.0.5")
    # an unencrypted cluster: nothing to protect more than the rest
    check_weights_privacy({}, "10.0.0.5")


def test_trainer_settings_after_the_backend_are_keyword_only_with_the_configs_defaults():
    import dataclasses
    import inspect

    from kerasonspark import DataConfig, FailureConfig
    from kerasonspark.engine import TrainingConfig

    params = list(inspect.signature(SparkTrainer.__init__).parameters.values())
    assert [p.name for p in params[:3]] == ["self", "model", "backend"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[3:])
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingConfig)}
    for name in ("num_workers", "batch_size", "epochs", "seed", "verbose"):
        assert inspect.signature(SparkTrainer.__init__).parameters[name].default == defaults[name]
    with pytest.raises(TypeError):
        SparkTrainer(small_model(), "sync", 2)  # type: ignore[misc]
    with pytest.raises(
        ConfigurationError, match="Expected `failure` to be a kerasonspark.FailureConfig"
    ):
        SparkTrainer(small_model(), failure={"max_restarts": 3})  # type: ignore[arg-type]
    trainer = SparkTrainer(
        small_model(), failure=FailureConfig(max_restarts=4), data=DataConfig(buffer_rows=8)
    )
    assert trainer.config.failure.max_restarts == 4 and trainer.config.data.buffer_rows == 8
    assert trainer.config.resources.worker_threads is None
