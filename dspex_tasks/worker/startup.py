"""What a worker checks and says when it starts: Redis reachable, which Redis and DB, quiet DSPy.

A worker that cannot reach Redis exits within seconds with one line naming the URL and the variable to
set, instead of Celery's retry-for-ever loop; it logs which Redis, DB and namespace it uses; DSPy's log
lines go through logging at their own level (not Celery's stdout redirect, as ``WARNING``), and tqdm
progress bars are off inside workers.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from ..connections import ping, redacted_url, unreachable_message
from ..errors import ConfigurationError
from ..settings import Settings

__all__ = ["RedisUnreachable", "preflight", "redis_line", "route_dspy_logging", "DspexWorkerMixin"]

log = logging.getLogger(__name__)

#: Exit status of a worker or gateway that cannot reach Redis (sysexits EX_UNAVAILABLE).
EXIT_UNAVAILABLE = 69


class RedisUnreachable(ConfigurationError):
    """Redis (or the broker) did not answer at start; the message names the URL and the variable to set."""


def _db(url: str) -> str:
    path = urlsplit(url).path.strip("/")
    return path or "0"


def redis_line(settings: Settings) -> str:
    """``Redis redis://127.0.0.1:6379/0 (db 0, DSPEX_REDIS_URL) · namespace dspex``: what a worker uses."""
    line = (f"Redis {redacted_url(settings.redis_url)} (db {_db(settings.redis_url)}, {settings.redis_url_source})"
            f" · namespace {settings.namespace}")
    if settings.broker != settings.redis_url:
        line += f" · broker {redacted_url(settings.broker)}"
    return line


def preflight(settings: Settings, *, wait_s: float | None = None, what: str = "worker") -> None:
    """Wait up to ``wait_s`` (``DSPEX_REDIS_WAIT_S``) for Redis and the broker to answer a PING.

    A RabbitMQ broker answers by accepting a connection (handshake, login and vhost), one attempt at a time.

    Raises:
        RedisUnreachable: one line naming the URL, the error, and ``DSPEX_REDIS_URL`` (or ``DSPEX_BROKER_URL``).
    """
    wait_s = settings.redis_wait_s if wait_s is None else wait_s
    targets = [("DSPEX_REDIS_URL", settings.redis_url)]
    if settings.broker != settings.redis_url:
        targets.append(("DSPEX_BROKER_URL", settings.broker))
    deadline = time.monotonic() + wait_s
    for variable, url in targets:
        while True:
            try:
                ping(url, timeout_s=max(0.5, min(3.0, wait_s)))
                break
            except Exception as exc:
                if time.monotonic() >= deadline:
                    kind = "Redis" if variable == "DSPEX_REDIS_URL" else (
                        "the broker" if settings.broker_is_redis else "RabbitMQ")
                    configured = variable != "DSPEX_REDIS_URL" or "redis_url" in settings.model_fields_set
                    raise RedisUnreachable(unreachable_message(
                        f"{what} cannot reach {kind} (waited {wait_s:g} s)", url, exc, variable=variable,
                        configured=configured)) from None
                time.sleep(0.25)


def route_dspy_logging() -> None:
    """DSPy's log lines through logging at their own level; no tqdm bars (they are for terminals, not logs).

    On import DSPy puts its own handler on the ``dspy`` logger (level INFO, ``propagate=False``) writing to
    ``sys.stderr``; inside a Celery worker ``sys.stderr`` is Celery's redirect, so every DSPy INFO line came
    out as ``WARNING/MainProcess``. Here the handler goes, the records propagate to the worker's handlers,
    and the worker's ``--loglevel`` decides, as for every other logger.
    """
    _no_progress_bars()
    import dspy  # noqa: F401 - configures its logger on import; undo that after, not before

    dspy_log = logging.getLogger("dspy")
    for handler in list(dspy_log.handlers):
        if getattr(handler, "name", None) == "dspy_handler":  # dspy.utils.logging_utils.configure_dspy_loggers
            dspy_log.removeHandler(handler)
    dspy_log.setLevel(logging.NOTSET)
    dspy_log.propagate = True


def _no_progress_bars() -> None:
    """tqdm bars off in this process (even where a caller passes ``disable=False``) and its children."""
    os.environ["TQDM_DISABLE"] = "1"  # read when tqdm is first imported (children, late imports)
    import tqdm.std

    init = tqdm.std.tqdm.__init__
    if init.__name__ == "quiet_init":
        return

    def quiet_init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    tqdm.std.tqdm.__init__ = quiet_init


class _UnmaskedUrl(logging.Filter):
    """Celery logs ``Connected to redis://:**@host`` for a URL with no password: show the URL as it is."""

    def __init__(self, masked: str, url: str) -> None:
        super().__init__()
        self.masked, self.url = masked, url

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.masked in message:
            record.msg, record.args = message.replace(self.masked, self.url), ()
        return True


def unmask_logged_urls(app: Any) -> None:
    """Install :class:`_UnmaskedUrl` on Celery's consumer loggers when the broker URL has no password."""
    broker = str(app.conf.broker_url or "")
    masked = app.connection().as_uri()
    if not broker or masked == redacted_url(broker):
        return
    for name in ("celery.worker.consumer.connection", "celery.worker.consumer.consumer"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UnmaskedUrl) for f in logger.filters):
            logger.addFilter(_UnmaskedUrl(masked, redacted_url(broker)))


class DspexWorkerMixin:
    """Celery's worker with a truthful banner: no ``:**@`` for a URL without a password, and our Redis line."""

    app: Any

    def startup_info(self, artlines: bool = True) -> str:
        info: str = super().startup_info(artlines)  # type: ignore[misc]
        settings = getattr(self.app, "dspex_settings", None)
        masked, broker = self.app.connection().as_uri(), self.app.conf.broker_url
        if broker and masked != redacted_url(broker):
            info = info.replace(masked, redacted_url(broker))
        if settings is not None:
            info += f"\n[dspex]\n  .> {redis_line(settings)}\n"
        return info


def fail_to_start(exc: BaseException) -> None:
    """One line on stderr (and in the log), then exit: what a worker does when it must not run."""
    if logging.getLogger().handlers:  # Celery's logging is set up: the line goes where the logs go
        log.critical("refusing to start: %s", exc)
    else:
        print(f"dspex: refusing to start: {exc}", file=sys.stderr, flush=True)
