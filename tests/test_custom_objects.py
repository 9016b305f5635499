"""Custom Keras objects reach the executors by themselves, from __main__ and from a helper module
the executors lack, for training, evaluate and predict, with every engine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kerasonspark import available_backends

pytestmark = pytest.mark.spark
SCRIPT = Path(__file__).parent / "custom_objects" / "train_custom.py"


def test_script_defined_layer_loss_and_metric_train_on_every_engine(tmp_path):
    # The script and its helper in a folder of their own, run as a user runs a script: the helper
    # is importable on the driver (the script's folder is on its path) and nowhere else.
    for name in ("train_custom.py", "custom_parts.py"):
        (tmp_path / name).write_text((SCRIPT.parent / name).read_text())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, str(tmp_path / "train_custom.py")], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path.parent, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("REPORT ")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    report = json.loads(lines[0][len("REPORT "):])
    assert report["executors_lack_helper"]
    for backend in available_backends():
        outcome = report[backend]
        assert {"top_probability", "mean_confidence", "val_top_probability", "val_mean_confidence"} <= set(outcome["history"])
        assert outcome["val_accuracy"] > 0.9, (backend, outcome)
    assert report["evaluate"]["accuracy"] > 0.9 and 0.5 < report["evaluate"]["top_probability"] <= 1.0
    assert report["predict_matches"]
