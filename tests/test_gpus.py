"""GPUs from Spark's resource scheduling: each worker pins the GPUs Spark gave its task before
TensorFlow starts. Tested without a GPU: a discovery script reports fake addresses on a real local
cluster, and TensorFlow, finding no device, trains on the CPU and says so."""

import pytest

from kerasonspark import ConfigurationError, ResourceConfig
from kerasonspark._executor import cuda_visible_devices

from conftest import run_driver_program


def test_spark_addresses_map_through_an_inherited_cuda_visible_devices():
    assert cuda_visible_devices(["1", "0"], None) == "1,0"
    assert cuda_visible_devices(["1"], "") == "1"
    # YARN and Kubernetes give the executor its own CUDA_VISIBLE_DEVICES; addresses index into it
    assert cuda_visible_devices(["1"], "5, 7") == "7"
    assert cuda_visible_devices(["0", "1"], "GPU-a1,GPU-b2") == "GPU-a1,GPU-b2"


def test_addresses_that_cannot_become_cuda_visible_devices_are_refused_with_the_fix():
    with pytest.raises(ConfigurationError, match="device indices"):
        cuda_visible_devices(["GPU-3f2a"], None)
    with pytest.raises(ConfigurationError, match="device indices"):
        cuda_visible_devices(["01"], None)
    with pytest.raises(ConfigurationError, match="holds 2 devices"):
        cuda_visible_devices(["2"], "5,7")
    with pytest.raises(ConfigurationError, match="devices"):
        ResourceConfig(devices="gpu")


@pytest.mark.spark
def test_each_task_pins_its_own_fake_gpu_and_the_warm_up_touches_none(tmp_path):
    script = tmp_path / "discover_gpus.sh"
    script.write_text('#!/bin/sh\necho \'{"name": "gpu", "addresses": ["0", "1"]}\'\n')
    script.chmod(0o755)
    report = run_driver_program("gpu_driver.py", str(script))
    devices = sorted(report["devices"], key=lambda d: d["spark_gpus"])
    # each task its own address, mapped through the executor's CUDA_VISIBLE_DEVICES=5,7
    assert [d["spark_gpus"] for d in devices] == [["0"], ["1"]]
    assert [d["cuda_visible_devices"] for d in devices] == ["5", "7"]
    # the warm-up (in the data pass, whose tasks hold GPUs too) left TensorFlow unstarted
    assert all(d["started_by"] == "training" for d in devices)
    # no GPU here: TensorFlow found none, trained on the CPU, and each worker said so once
    assert all(d["device"] == "CPU" and "assigned_gpus" not in d for d in devices)
    fallbacks = [line for line in report["logs"] if "TensorFlow finds no GPU" in line]
    assert len(fallbacks) == 2, report["logs"]
    assert report["accuracy"] > 0.9
