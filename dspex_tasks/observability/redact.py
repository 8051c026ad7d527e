"""Configured secrets never leave a worker: masked in error text, log lines and stored results.

A provider that refuses a key often echoes it in its 401 body; that text becomes an exception message, and an
exception message is stored in the result backend, sent in the task events Flower shows and logged by Celery.
:func:`secrets_of` lists what must not appear (LM keys, provider keys in the environment, Redis passwords);
:func:`redact` masks each with ``***``. Workers call :func:`install` on ``worker_init``: it sets the process's
secrets and puts :class:`RedactingFilter` on every log handler, including the ones Celery adds later.

Typed errors are redacted where they are made from a provider exception (``lm.errors.to_lm_error``,
``worker.runner.classify_lm_error``) and where an optimization run records its failure; the filter is the
safety net for everything that is only logged.

Example:
    >>> use_secrets(["sk-live-0123456789"])
    >>> redact("401: invalid key sk-live-0123456789")
    '401: invalid key ***'
    >>> use_secrets(None)
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:  # pragma: no cover
    from ..settings import Settings

__all__ = ["MASK", "MIN_SECRET_LEN", "RedactingFilter", "install", "redact", "redact_error", "secrets_of",
           "use_secrets"]

MASK = "***"
#: Shorter values are not treated as secrets: masking "redis" or "admin" everywhere would garble every log line.
MIN_SECRET_LEN = 8
#: Environment variables whose values are secrets by name.
_SECRET_NAME = re.compile(r"(_API_KEY|_TOKEN|_SECRET)$")
_URL_VARS = ("DSPEX_REDIS_URL", "DSPEX_BROKER_URL", "DSPEX_RESULT_BACKEND")
_CHAIN_DEPTH = 8  # how far redact_error follows __cause__/__context__

E = TypeVar("E", bound=BaseException)


def _url_password(url: str | None) -> list[str]:
    if not url:
        return []
    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    return [password, unquote(password)] if password else []


def secrets_of(settings: Settings | None, environ: Mapping[str, str]) -> list[str]:
    """Every configured secret: ``settings.lm_api_key``, env vars named ``*_API_KEY``, ``*_TOKEN`` or
    ``*_SECRET``, the variables named by ``api_key_env`` in ``lm_endpoints``, and passwords in the Redis URLs.

    Values shorter than :data:`MIN_SECRET_LEN` are left out. Longest first, so a secret that contains
    another is masked whole.
    """
    found: list[str] = [value for name, value in environ.items() if _SECRET_NAME.search(name.upper())]
    for name in _URL_VARS:
        found += _url_password(environ.get(name))
    if settings is not None:
        found.append(settings.lm_api_key_value() or "")
        for url in (settings.redis_url, settings.broker_url, settings.result_backend):
            found += _url_password(url)
        for endpoint in settings.lm_endpoints.values():
            var = endpoint.get("api_key_env") if isinstance(endpoint, Mapping) else None
            if isinstance(var, str):
                found.append(environ.get(var, ""))
    unique = {s for s in found if isinstance(s, str) and len(s) >= MIN_SECRET_LEN}
    return sorted(unique, key=lambda s: (-len(s), s))


class _Secrets:
    """A fixed set of secrets and the one pattern that finds any of them."""

    def __init__(self, values: Iterable[str]) -> None:
        self.values = tuple(sorted({v for v in values if len(v) >= MIN_SECRET_LEN}, key=lambda s: (-len(s), s)))
        self.pattern = re.compile("|".join(map(re.escape, self.values))) if self.values else None

    def redact(self, text: str) -> str:
        return self.pattern.sub(MASK, text) if self.pattern is not None else text


# The process's secrets, set once per worker by install(); None: read them from the environment on each call
# (a client or a test process that never installed anything still masks its provider keys).
_active: _Secrets | None = None


def use_secrets(values: Iterable[str] | None) -> None:
    """Make ``values`` this process's secrets (``None``: derive them from ``os.environ`` on each call)."""
    global _active
    _active = None if values is None else _Secrets(values)


def _current() -> _Secrets:
    return _active if _active is not None else _Secrets(secrets_of(None, os.environ))


def redact(text: str) -> str:
    """``text`` with every configured secret replaced by ``***``."""
    return _current().redact(text)


def _clean(value: Any, secrets: _Secrets) -> Any:
    if isinstance(value, str):
        return secrets.redact(value)
    if isinstance(value, list | tuple):
        return type(value)(_clean(v, secrets) for v in value)
    if isinstance(value, dict):
        return {k: _clean(v, secrets) for k, v in value.items()}
    return value


def redact_error(exc: E) -> E:
    """Mask secrets in ``exc``'s args (and its causes'), in place: the same object, safe to store and log.

    Returns:
        ``exc`` itself, so ``raise redact_error(exc)`` reads naturally.
    """
    secrets = _current()
    if secrets.pattern is None:
        return exc
    seen: BaseException | None = exc
    for _ in range(_CHAIN_DEPTH):
        if seen is None:
            break
        try:
            seen.args = tuple(_clean(a, secrets) for a in seen.args)
            message = getattr(seen, "message", None)  # DSPy's and LiteLLM's errors keep their own copy
            if isinstance(message, str):
                seen.message = secrets.redact(message)  # type: ignore[attr-defined]
        except (AttributeError, TypeError):  # a read-only property or an exotic args: leave it to the log filter
            pass
        seen = seen.__cause__ or seen.__context__
    return exc


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message, arguments, traceback and stack before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = _current()
        if secrets.pattern is None:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: the handler reports it; mask what it will print
            message = str(record.msg)
        clean = secrets.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = secrets.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = secrets.redact(record.stack_info)
        return True


_FILTER = RedactingFilter()


def _filter_handlers(**_: Any) -> None:
    """Put the filter on every handler of the root logger and of loggers with handlers of their own (Celery's
    task logger does not propagate)."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for handler in list(lg.handlers):
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)


def install(settings: Settings | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Mask this worker's secrets from now on: in :func:`redact` and on every log handler.

    Called on ``worker_init``, before Celery sets up its logging: the filter is added again whenever Celery
    (re)configures its loggers, in the main process and in pool children.
    """
    from celery import signals

    use_secrets(secrets_of(settings, os.environ if environ is None else environ))
    _filter_handlers()
    for signal in (signals.after_setup_logger, signals.after_setup_task_logger, signals.worker_process_init,
                   signals.worker_ready):
        signal.connect(_filter_handlers, weak=False, dispatch_uid="dspex-redact")
