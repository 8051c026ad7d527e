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
    "InvalidSession",
    "ProgramNotFound",
    "ConfigurationError",
    "LMError",
    "LMParseError",
    "LMTimeout",
    "LMContextLengthExceeded",
    "TaskTimeout",
    "ResultLost",
    "DeadLettered",
    "BackendUnavailable",
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


class InvalidSession(DspexError):
    """Raised when a session or program id is not 1-128 chars of ``[A-Za-z0-9._:-]``."""

    code = "invalid_session"


class ProgramNotFound(DspexError):
    """Raised when a stored program (or one of its versions) does not exist."""

    code = "program_not_found"


class ConfigurationError(DspexError):
    """Raised when settings or the environment cannot work (bad URL, unsafe Redis policy)."""

    code = "configuration_error"


class LMError(DspexError):
    """Raised when the language model call fails after its retry budget."""

    code = "lm_error"


class LMParseError(LMError):
    """Raised when the LM answered but its output does not parse into the signature.

    ``errors`` lists the output fields that did not fit, when known.
    """

    code = "lm_parse_error"

    @property
    def errors(self) -> list[dict[str, str]]:
        return list(self.args[1]) if len(self.args) > 1 and isinstance(self.args[1], list) else []


class LMTimeout(LMError):
    """Raised when the LM did not answer within ``DSPEX_LM_TIMEOUT_S`` (not retried on the same model)."""

    code = "lm_timeout"


class LMContextLengthExceeded(LMError):
    """Raised when the prompt exceeds the model's context window (never retried)."""

    code = "lm_context_length_exceeded"


class BackendUnavailable(DspexError):
    """Raised when Redis (broker or result backend) does not answer within its socket timeout."""

    code = "backend_unavailable"


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
    cls.__name__: cls
    for cls in (
        DspexError,
        SignatureError,
        ValidationError,
        UnknownSignature,
        InvalidSession,
        ProgramNotFound,
        ConfigurationError,
        LMError,
        LMParseError,
        LMTimeout,
        LMContextLengthExceeded,
        TaskTimeout,
        ResultLost,
        DeadLettered,
        BackendUnavailable,
    )
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
