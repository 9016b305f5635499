"""The parameter server: a Flask app on the driver, its binary wire format, auth and client.

:mod:`.client` and :mod:`.wire` are public (a client in another language follows the wire format's
page); the rest is internal. Executors import only the client and the wire format (and the engines'
store and rules, which are plain Python); the Flask app and its server load on first use of their
names here, so importing this package never imports Flask.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._app import ServerConfig, create_app
    from ._auth import new_secret
    from ._rules import RULES, UpdateRule, make_rule
    from ._server import ParameterServer
    from ._store import ParameterStore
    from .client import ParameterClient

_WHERE = {
    "ParameterClient": "client",
    "ParameterServer": "_server",
    "ParameterStore": "_store",
    "RULES": "_rules",
    "ServerConfig": "_app",
    "UpdateRule": "_rules",
    "create_app": "_app",
    "make_rule": "_rules",
    "new_secret": "_auth",
}

__all__ = [
    "RULES",
    "ParameterClient",
    "ParameterServer",
    "ParameterStore",
    "ServerConfig",
    "UpdateRule",
    "create_app",
    "make_rule",
    "new_secret",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
