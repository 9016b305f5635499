"""The parameter server: a Flask app on the driver, its binary wire format, auth and client.

Executors import only :mod:`.client` and :mod:`.wire` (and the engines' :mod:`.store` and
:mod:`.rules`, which are plain Python); the Flask app and its server load on first use of their
names here, so importing this package never imports Flask.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {"ParameterClient": "client", "ParameterServer": "server", "ParameterStore": "store", "RULES": "rules",
          "ServerConfig": "app", "UpdateRule": "rules", "create_app": "app", "make_rule": "rules",
          "new_secret": "auth"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
