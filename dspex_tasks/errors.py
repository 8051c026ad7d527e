"""One error tree for the whole package.

Every error is a :class:`DspexError` with a stable ``code``; callers can
``except DspexError``. Errors cross the wire as JSON (Celery's JSON exception
encoding stores ``type``, ``module`` and ``args``), so every class is
rebuildable from its positional ``args`` alone: keep constructors positional.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DspexError",
    "SignatureError",
    "ValidationError",
    "UnknownSignature",
    "InvalidId",
    "InvalidSession",
    "NotFound",
    "ProgramNotFound",
    "SessionNotFound",
    "RunNotFound",
    "DatasetNotFound",
    "JobNotFound",
    "ApiKeyNotFound",
    "ConfigurationError",
    "Cancelled", "BudgetExceeded",
    "LMError",
    "LMParseError",
    "LMTimeout",
    "LMContextLengthExceeded",
    "LMAuthError",
    "LMRetryableError",
    "LMRateLimitError",
    "LMServerError",
    "LMConnectionError",
    "RateLimited",
    "TaskTimeout",
    "ResultLost",
    "DeadLettered",
    "BackendUnavailable",
    "StoreFull",
    "from_remote",
]


class DspexError(Exception):
    """Root of every error raised by dspex-tasks."""

    code = "dspex_error"

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code

    def __str__(self) -> str:
        return self.message


class SignatureError(DspexError):
    """Raised when a signature spec is malformed (at definition time)."""

    code = "signature_error"


class ValidationError(DspexError):
    """Raised when inputs or outputs do not fit a signature.

    ``errors`` lists ``{"field": "path.to.field", "message": ...}`` dicts.
    """

    code = "validation_error"

    def __init__(self, message: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(message, list(errors or []))

    @property
    def errors(self) -> list[dict[str, str]]:
        return list(self.args[1]) if len(self.args) > 1 else []

    @classmethod
    def from_errors(cls, what: str, errors: list[dict[str, str]]) -> ValidationError:
        """Build the error with a one-line summary naming every bad field."""
        shown = "; ".join(f"{e['field'] or '<root>'}: {e['message']}" for e in errors[:5])
        more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
        return cls(f"invalid {what}: {shown}{more}", errors)


class UnknownSignature(DspexError):
    """Raised when a signature name is not registered or published."""

    code = "unknown_signature"


class InvalidId(DspexError):
    """Raised when an id (dataset, schedule, API key, token) is not 1-128 chars of ``[A-Za-z0-9._:-]``, or a run
    id not 32 lowercase hex characters."""

    code = "invalid_id"


class InvalidSession(InvalidId):
    """Raised when a session or program id is not 1-128 chars of ``[A-Za-z0-9._:-]``."""

    code = "invalid_session"


class NotFound(DspexError):
    """Raised when a stored thing (program, session, run, dataset, job, API key) does not exist."""

    code = "not_found"


class ProgramNotFound(NotFound):
    """Raised when a stored program (or one of its versions) does not exist."""

    code = "program_not_found"


class SessionNotFound(NotFound):
    """Raised when a session holds no programs."""

    code = "session_not_found"


class RunNotFound(NotFound):
    """Raised when an optimization run does not exist (or its record expired)."""

    code = "run_not_found"


class DatasetNotFound(NotFound):
    """Raised when a named dataset does not exist."""

    code = "dataset_not_found"


class JobNotFound(NotFound):
    """Raised when a job id is unknown (or its result expired)."""

    code = "job_not_found"


class ApiKeyNotFound(NotFound):
    """Raised when no gateway API key has the given id or name."""

    code = "api_key_not_found"


class ConfigurationError(DspexError):
    """Raised when settings or the environment cannot work (bad URL, unsafe Redis policy)."""

    code = "configuration_error"


class Cancelled(DspexError):
    """Raised when a job or an optimization run was cancelled before it finished."""

    code = "cancelled"


class BudgetExceeded(DspexError):
    """Raised when an optimization run spent its budget (``max_cost_usd`` or ``max_lm_calls``): it stops at the
    next stage boundary, promoting nothing; the message names what was spent against which limit."""

    code = "budget_exceeded"


# -- the LM subtree: each class says whether the task may retry it (``retryable``) and after how long ----------
class LMError(DspexError):
    """Raised when the language model call fails after its retry budget.

    ``retryable`` says whether the task may run again (the class decides, never the message text);
    ``retry_after`` is the provider's requested wait in seconds, when it gave one.
    """

    code = "lm_error"
    retryable = False

    @property
    def retry_after(self) -> float | None:
        return None


class LMParseError(LMError):
    """Raised when the LM answered but its output does not parse into the signature.

    ``errors`` lists the output fields that did not fit, when known.
    """

    code = "lm_parse_error"

    @property
    def errors(self) -> list[dict[str, str]]:
        return list(self.args[1]) if len(self.args) > 1 and isinstance(self.args[1], list) else []


class LMTimeout(LMError):
    """Raised when the LM did not answer within ``DSPEX_LM_TIMEOUT_S`` (not retried: it already took that long)."""

    code = "lm_timeout"


class LMContextLengthExceeded(LMError):
    """Raised when the prompt exceeds the model's context window (never retried)."""

    code = "lm_context_length_exceeded"


class LMAuthError(LMError):
    """Raised when the provider refused the credentials (HTTP 401 or 403): never retried, it needs a new key.

    An optimization whose every evaluation call failed this way fails with it instead of scoring 0.
    """

    code = "lm_auth_error"


class LMRetryableError(LMError):
    """Raised when the provider failed in a way worth another attempt, after the in-call retries were spent.

    Args:
        message: What failed.
        retry_after: The provider's ``Retry-After`` in seconds, when it gave one.
    """

    code = "lm_retryable"
    retryable = True

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after)

    @property
    def retry_after(self) -> float | None:
        value = self.args[1] if len(self.args) > 1 else None
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class LMRateLimitError(LMRetryableError):
    """Raised when the provider rate-limited the call (HTTP 429) on every model of the route."""

    code = "lm_rate_limit"


class LMServerError(LMRetryableError):
    """Raised when the provider failed on its side (5xx) on every model of the route."""

    code = "lm_server_error"


class LMConnectionError(LMRetryableError):
    """Raised when the provider could not be reached (connection, DNS, TLS) on every model of the route."""

    code = "lm_connection_error"


class RateLimited(LMError):
    """Raised when a fleet-wide limit (or the provider's ``Retry-After``) needs a longer wait than a thread
    should hold.

    The task re-queues itself with ``countdown_s`` on a budget of its own; it never reaches a client as a
    failure.

    Args:
        countdown_s: Seconds until the task should run again.
        message: What is saturated.
        provider: True when the provider asked for the wait (counts against the task's LM retry budget).
        slot: A slot reserved for the task, ``{"key": buckets, "at": Redis time in ms}``, to redeem then.
    """

    code = "rate_limited"
    retryable = True

    def __init__(self, countdown_s: float, message: str = "", provider: bool = False,
                 slot: dict[str, Any] | None = None) -> None:
        super().__init__(float(countdown_s), message or f"rate limited; retry in {float(countdown_s):.2f}s",
                         bool(provider), slot)

    @property
    def countdown_s(self) -> float:
        return float(self.args[0])

    @property
    def retry_after(self) -> float | None:
        return self.countdown_s

    @property
    def message(self) -> str:
        return str(self.args[1])

    @property
    def provider(self) -> bool:
        return bool(self.args[2])

    @property
    def slot(self) -> dict[str, Any] | None:
        slot = self.args[3] if len(self.args) > 3 else None
        return slot if isinstance(slot, dict) else None


class BackendUnavailable(DspexError):
    """Raised when Redis (broker or result backend) does not answer within its socket timeout."""

    code = "backend_unavailable"


class StoreFull(DspexError):
    """Raised when Redis refused a write because it is full: used memory above its ``maxmemory`` with the
    ``noeviction`` policy workers require. The refused write did not happen (a submit enqueued nothing); free
    memory or raise ``maxmemory``.
    """

    code = "store_full"


class DeadLettered(DspexError):
    """Raised when a message was delivered too many times (its worker kept dying) and was set aside."""

    code = "dead_letter"


class TaskTimeout(DspexError):
    """Raised when waiting for a job result exceeds its timeout."""

    code = "timeout"


class ResultLost(DspexError):
    """Raised when a job's result is gone (expired or the backend lost it)."""

    code = "result_lost"


_BY_NAME: dict[str, type[DspexError]] = {
    cls.__name__: cls for cls in (globals()[name] for name in __all__ if name != "from_remote")
}


def from_remote(exc_type: str, args: Any) -> DspexError:
    """Rebuild a remote failure as the matching ``errors.*`` class (else ``DspexError``)."""
    cls = _BY_NAME.get(exc_type)
    if not isinstance(args, (list, tuple)):
        args = (str(args),)
    if cls is None:
        return DspexError(f"{exc_type}: {args[0] if args else ''}")
    try:
        return cls(*args)
    except TypeError:
        return cls(str(args[0]) if args else exc_type)
