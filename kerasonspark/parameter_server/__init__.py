"""The parameter server: a Flask app on the driver, its binary wire format, auth and client."""

from .app import ServerConfig, create_app
from .auth import new_secret
from .client import ParameterClient
from .rules import RULES, UpdateRule, make_rule
from .server import ParameterServer
from .store import ParameterStore

__all__ = ["ParameterClient", "ParameterServer", "ParameterStore", "RULES", "ServerConfig", "UpdateRule",
           "create_app", "make_rule", "new_secret"]
