"""Errors of the runtime: one class per failure a caller can act on differently.

Every request ends in a result or one of these, never silence. Each class names the
wire error it travels as (``code_name``, a member of ``protocol.Err``), so a worker's
error reaches the client as the same type. Messages name the object, expected vs
actual, and the next step.
"""
from __future__ import annotations

from edgesplit.partitioner.errors import EdgesplitError, UsageError


class RuntimeFailure(EdgesplitError):
    """Base of the runtime's errors; ``code_name`` is the ``protocol.Err`` it travels as."""

    code_name = "INTERNAL"


class ProtocolError(RuntimeFailure):
    """A message broke the wire format (bad version, header, dtype, frame length, size)."""

    code_name = "BAD_MESSAGE"


class UnknownModel(RuntimeFailure):
    """The model is not in the coordinator's store, or not deployed on any live worker."""

    code_name = "UNKNOWN_MODEL"


class NotDeployed(UnknownModel):
    """The model's plan is being (re)deployed right now (a re-plan after a lost worker): ask again shortly."""

    code_name = "NOT_DEPLOYED"


class BadInput(RuntimeFailure):
    """The input does not fit the model (shape, dtype), or the stage failed on it."""

    code_name = "BAD_INPUT"


class WorkerLost(RuntimeFailure):
    """A worker on the request's route died or stopped heartbeating."""

    code_name = "WORKER_LOST"


class RequestTimeout(RuntimeFailure, TimeoutError):
    """The request's deadline passed before a result arrived."""

    code_name = "TIMEOUT"


class DeadlineUnmeetable(RuntimeFailure):
    """The coordinator's admission refused the request: it cannot meet its deadline (the message says why).

    Sent before any input moved, so refusing costs the user nothing but the answer.
    """

    code_name = "DEADLINE_UNMEETABLE"


class DeadlineMissed(RuntimeFailure):
    """An admitted request's result came after its deadline: never handed out as on time.

    ``result`` is the output anyway (for callers that can still use it); ``late_ms`` is by how much it missed.
    """

    code_name = "TIMEOUT"

    def __init__(self, message: str, late_ms: float = 0.0, result: object = None) -> None:
        super().__init__(message)
        self.late_ms = late_ms
        self.result = result


class Overloaded(RuntimeFailure):
    """A queue or table was full and the request was refused rather than queued without bound."""

    code_name = "OVERLOADED"


class Forbidden(RuntimeFailure):
    """A keyed cluster refused the message: the sender's key has another role (a user asking to deploy), or
    its route position does not allow it (a RUN for hop k from a worker the plan does not put at hop k-1)."""

    code_name = "FORBIDDEN"


class DeployError(RuntimeFailure):
    """A plan could not be deployed (bad plan, missing blocks, memory budget, worker error)."""

    code_name = "DEPLOY_FAILED"


class ConfigError(RuntimeFailure, UsageError):
    """A configuration value or file is invalid (unknown key, bad size, bad endpoint)."""

    code_name = "INTERNAL"
