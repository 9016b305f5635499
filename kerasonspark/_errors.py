"""Exceptions raised by kerasonspark.

All of them derive from one root, so ``except KerasOnSparkError`` catches everything the
library raises on purpose::

    KerasOnSparkError
     ├── ConfigurationError (ValueError)     a bad argument or backend option
     ├── DataError (ValueError)              input data that cannot be trained on as given
     ├── SparkEnvironmentError (RuntimeError) Java or Spark missing or unusable
     ├── WorkerError (RuntimeError)          a Spark task failed while training
     ├── BarrierTimeoutError (RuntimeError)  a round barrier waited too long for a worker
     └── ParameterServerError (RuntimeError) the parameter server refused or failed a request
          └── WireFormatError (ValueError)    a malformed message on the wire
"""

from __future__ import annotations


class KerasOnSparkError(Exception):
    """Root of every exception kerasonspark raises on purpose."""


class ConfigurationError(KerasOnSparkError, ValueError):
    """A trainer argument or backend option is invalid."""


class DataError(KerasOnSparkError, ValueError):
    """The training or evaluation data cannot be used as given."""


class SparkEnvironmentError(KerasOnSparkError, RuntimeError):
    """Java or Spark is missing or cannot start."""


class ParameterServerError(KerasOnSparkError, RuntimeError):
    """The parameter server refused a request or could not serve it.

    Attributes:
        status: the HTTP status the server answered with (0 when no answer came).
    """

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # keep `status` when Spark pickles the exception
        return (type(self), (str(self), self.status))


class WireFormatError(ParameterServerError, ValueError):
    """A message does not follow the parameter server's wire format."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message, status)


class BarrierTimeoutError(KerasOnSparkError, RuntimeError):
    """A synchronisation round did not complete because workers were missing.

    Attributes:
        round: the round that failed.
        missing: ids of the workers that never arrived.
    """

    def __init__(self, message: str, round: int = -1, missing: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.round = round
        self.missing = tuple(missing)

    def __reduce__(self):
        return (type(self), (str(self), self.round, self.missing))


class WorkerError(KerasOnSparkError, RuntimeError):
    """A worker (one Spark task) failed during training.

    Attributes:
        worker: the worker id (the Spark partition index), or -1 when unknown.
        detail: the worker's own error text (its traceback tail) when it reported one.
    """

    def __init__(self, message: str, worker: int = -1, detail: str = "") -> None:
        super().__init__(message)
        self.worker = worker
        self.detail = detail

    def __reduce__(self):
        return (type(self), (str(self), self.worker, self.detail))


# Tracebacks and reprs name the public path (``kerasonspark.DataError``), not this module; the
# driver reads that name back from a failed Spark task's text.
for _error in (
    KerasOnSparkError,
    ConfigurationError,
    DataError,
    SparkEnvironmentError,
    ParameterServerError,
    WireFormatError,
    BarrierTimeoutError,
    WorkerError,
):
    _error.__module__ = "kerasonspark"
del _error
