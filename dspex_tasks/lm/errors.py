"""What an LM failure means, decided by its class: typed errors, whether to retry, and after how long.

Provider failures reach us as DSPy's error classes (``dspy.utils.exceptions``), or, from code that calls a
provider SDK directly, as LiteLLM/OpenAI classes. :func:`error_class` maps any of them to the
:class:`~dspex_tasks.errors.LMError` subtree, whose classes carry the decision as data:

========================================  =================================  =========================
provider failure                          dspex error                        the task retries it
========================================  =================================  =========================
429 rate limit                            ``LMRateLimitError``               yes (after ``retry_after``)
5xx server error                          ``LMServerError``                  yes
connection, DNS, TLS, credential lock     ``LMConnectionError``              yes
timeout                                   ``LMTimeout``                      no (it already took that long)
prompt too long for the context window    ``LMContextLengthExceeded``        no
401/403 credentials refused               ``LMAuthError``                    no
anything else (invalid request)           ``LMError``                        no
========================================  =================================  =========================

The governed LM (:mod:`.governed`) applies the same table to its in-call retries (:func:`classify`), and the
worker decides a task retry from ``exc.retryable`` alone: nothing reads message text. A typed error's message
never carries a configured secret (a provider's 401 may echo the key): :func:`to_lm_error` redacts it
(:mod:`dspex_tasks.observability.redact`).
"""

from __future__ import annotations

from typing import Literal

from ..errors import (
    LMAuthError,
    LMConnectionError,
    LMContextLengthExceeded,
    LMError,
    LMParseError,
    LMRateLimitError,
    LMRetryableError,
    LMServerError,
    LMTimeout,
    RateLimited,
)
from ..observability.redact import redact, redact_error

__all__ = ["LMError", "LMParseError", "LMTimeout", "LMContextLengthExceeded", "LMAuthError", "LMRetryableError",
           "LMRateLimitError", "LMServerError", "LMConnectionError", "RateLimited", "error_class", "classify",
           "to_lm_error", "retry_after_of", "Kind"]

Kind = Literal["context", "timeout", "retry", "fatal"]

# Provider SDK classes by name (LiteLLM re-exports OpenAI's), so this module never imports litellm.
_BY_NAME: dict[str, type[LMError]] = {
    "RateLimitError": LMRateLimitError,
    "LMRateLimitError": LMRateLimitError,
    "InternalServerError": LMServerError,
    "ServiceUnavailableError": LMServerError,
    "BadGatewayError": LMServerError,
    "LMServerError": LMServerError,
    "APIConnectionError": LMConnectionError,
    "LMTransportError": LMConnectionError,
    "LMLockTimeoutError": LMConnectionError,
    "ContextWindowExceededError": LMContextLengthExceeded,
    "AuthenticationError": LMAuthError,  # LiteLLM/OpenAI 401
    "PermissionDeniedError": LMAuthError,  # LiteLLM/OpenAI 403
    "LMAuthError": LMAuthError,  # DSPy's (401/403); dspex's own is caught by isinstance first
}
_LOCK_TIMEOUT = "LMLockTimeoutError"  # a local credential lock, not a slow provider: retryable, not a timeout


def _is_timeout(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None or type(seen).__name__ == _LOCK_TIMEOUT:
            return False
        if isinstance(seen, TimeoutError) or "Timeout" in type(seen).__name__:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def error_class(exc: BaseException) -> type[LMError]:
    """The dspex class for a provider failure (walking the class hierarchy, then the cause chain for timeouts)."""
    if isinstance(exc, LMError):
        return type(exc)
    names = [c.__name__ for c in type(exc).__mro__]
    if "ContextWindowExceededError" in names:
        return LMContextLengthExceeded
    if _is_timeout(exc):
        return LMTimeout
    for name in names:
        found = _BY_NAME.get(name)
        if found is not None:
            return found
    return LMError


def classify(exc: BaseException) -> Kind:
    """``"context"``, ``"timeout"``, ``"retry"`` or ``"fatal"``: what the governed LM does with a failure."""
    cls = error_class(exc)
    if issubclass(cls, LMContextLengthExceeded):
        return "context"
    if issubclass(cls, LMTimeout):
        return "timeout"
    return "retry" if cls.retryable else "fatal"


def retry_after_of(exc: BaseException) -> float | None:
    """The provider's ``Retry-After`` in seconds, when the error carries one."""
    hint = getattr(exc, "retry_after", None)
    if isinstance(hint, int | float) and not isinstance(hint, bool) and hint >= 0:
        return float(hint)
    return None


def to_lm_error(exc: BaseException, message: str) -> LMError:
    """``exc`` as its dspex class, with ``message`` (and the provider's ``Retry-After`` for retryable ones).

    Configured secrets are masked in the message: it reaches the stored result, Flower and the logs.
    """
    if isinstance(exc, LMError):
        return redact_error(exc)
    cls = error_class(exc)
    if issubclass(cls, LMRetryableError):
        return cls(redact(message), retry_after_of(exc))
    return cls(redact(message))
