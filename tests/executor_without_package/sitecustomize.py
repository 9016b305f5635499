"""On an executor's PYTHONPATH (tests/test_cluster.py puts it there), this makes the executors'
Python unable to import the kerasonspark checkout: it drops the editable install's finder. It also
hides the modules named in KOS_TEST_HIDE (comma-separated), as if they were not installed."""

import os
import sys

sys.meta_path[:] = [
    finder for finder in sys.meta_path if "kerasonspark" not in getattr(finder, "__module__", "")
]
for name in filter(None, os.environ.get("KOS_TEST_HIDE", "").split(",")):
    sys.modules[name] = None  # importlib.util.find_spec answers None, import raises ImportError
