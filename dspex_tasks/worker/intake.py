"""Refusing hostile broker messages before they reach a task, without losing the worker.

Celery trusts a message's shape: a body that is not protocol 2's ``[args, kwargs, embed]``, a raw content
type, or a bad ``timelimit`` header raises inside its consumer and ends the worker, and the restored message
then kills the next one. Kombu decompresses a body before anyone sees it, so a small gzip body can inflate to
gigabytes. Three hooks Celery and kombu offer close this:

* :func:`strategy` (``DspexTask.Strategy``) checks headers, content type, raw body size and the decoded
  shape before Celery's default strategy builds a request, and raises ``InvalidTaskError``, which Celery's
  consumer handles by rejecting (acknowledging) the message;
* :func:`install_decompression` registers kombu decompressors that refuse compressed bodies unless
  ``DSPEX_ACCEPT_COMPRESSION`` is set, and then never inflate past the body cap;
* :class:`Consumer` (Celery's ``worker_consumer``) dead-letters every message Celery refuses (invalid,
  undecodable, of no known format or task) with a reason, and stores a small failure for its task id so
  a waiting client learns at once; the failure never holds the message's arguments.

The same consumer sends Celery's task events (what Flower shows) in batches: Celery buffers them
(``task-multi`` messages, which Flower and every ``EventReceiver`` unpack) but flushes the buffer on the hub's
next tick, so under load nearly every event is a message of its own: a Redis ``PUBLISH`` through a new kombu
client object each, ~15% of a busy worker's CPU. Here a flush waits up to :data:`EVENT_FLUSH_S` (100 ms), or
until :data:`EVENT_BUFFER` events are buffered, so Flower sees them at most that much later.
"""

from __future__ import annotations

import bz2
import logging
import lzma
import os
import zlib
from collections.abc import Callable
from functools import cached_property
from typing import Any

from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.strategy import default as default_strategy
from kombu import compression as _compression
from kombu import serialization as _serialization

from ..errors import DeadLettered
from .guard import dead_letter

__all__ = ["Consumer", "body_cap", "check_body", "check_headers", "event_dispatcher", "install_decompression",
           "strategy"]

log = logging.getLogger(__name__)

# kombu ships no type hints
compression: Any = _compression
serialization: Any = _serialization

_OPTIONAL_STR_HEADERS = ("root_id", "parent_id", "group", "shadow")
_EMBED_LISTS = ("callbacks", "errbacks", "chain")


def body_cap(max_payload_bytes: int) -> int:
    """The largest raw (decompressed) message body a worker decodes: twice the input cap, for the envelope."""
    return 2 * max_payload_bytes


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


def check_headers(headers: Any) -> str | None:
    """Why protocol-2 ``headers`` cannot be served, or None when they can."""
    if not isinstance(headers, dict):
        return f"headers must be a mapping, got {type(headers).__name__}"
    if not isinstance(headers.get("id"), str) or not headers["id"]:
        return "header 'id' must be a non-empty string"
    if not isinstance(headers.get("task"), str):
        return "header 'task' must be a string"
    for name in _OPTIONAL_STR_HEADERS:
        if headers.get(name) is not None and not isinstance(headers[name], str):
            return f"header {name!r} must be a string or null"
    retries = headers.get("retries", 0)
    if retries is not None and not (isinstance(retries, int) and not isinstance(retries, bool) and retries >= 0):
        return "header 'retries' must be a non-negative integer"
    limit = headers.get("timelimit")
    if limit is not None and not (isinstance(limit, (list, tuple)) and len(limit) == 2
                                  and all(v is None or _number(v) for v in limit)):
        return "header 'timelimit' must be [hard, soft] seconds (numbers or null)"
    return None


def check_body(payload: Any) -> str | None:
    """Why a decoded body is not protocol 2's ``[args, kwargs, embed]``, or None when it is."""
    if not isinstance(payload, (list, tuple)) or len(payload) != 3:
        shape = f"{len(payload)} elements" if isinstance(payload, (list, tuple)) else type(payload).__name__
        return f"body must be [args, kwargs, embed], got {shape}"
    args, kwargs, embed = payload
    if not isinstance(args, (list, tuple)):
        return "body args must be a list"
    if not isinstance(kwargs, dict):
        return "body kwargs must be a mapping"
    if embed is None:
        return None
    if not isinstance(embed, dict):
        return "body embed must be a mapping or null"
    for name in _EMBED_LISTS:
        if embed.get(name) is not None and not isinstance(embed[name], list):
            return f"embed {name!r} must be a list or null"
    if embed.get("chord") is not None and not isinstance(embed["chord"], dict):
        return "embed 'chord' must be a mapping or null"
    return None


def _refusal(message: Any, accept: set[str], cap: int) -> str | None:
    problem = check_headers(message.headers)
    if problem:
        return problem
    if message.content_type not in accept:
        return f"refused content type {message.content_type!r} (accepted: {', '.join(sorted(accept))})"
    size = len(message.body or b"")
    if size > cap:
        return f"refused a body of {size} bytes (more than {cap} bytes: twice DSPEX_MAX_PAYLOAD_BYTES)"
    return check_body(message.decode())  # kombu's DecodeError is Celery's to handle: it acks and logs


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's default strategy, behind a check of the message's shape (``Task.Strategy``)."""
    handle = default_strategy(task, app, consumer, **kwargs)
    accept = set(serialization.prepare_accept_content(app.conf.accept_content))
    cap = body_cap(app.dspex_settings.max_payload_bytes)

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
        problem = _refusal(message, accept, cap)
        if problem:
            raise InvalidTaskError(problem)
        return handle(message, body, ack, reject, callbacks, **kw)

    return on_message


# -- compression ------------------------------------------------------------------------------------------------
def _bounded(make: Callable[[], Any], cap: int) -> Callable[[bytes], bytes]:
    def decompress(body: bytes) -> bytes:
        if len(body) > cap:
            raise ValueError(f"refused a compressed body of {len(body)} bytes (more than {cap})")
        out: bytes = make().decompress(body, cap + 1)  # max_length: never inflates past the cap
        if len(out) > cap:
            raise ValueError(f"refused a compressed body that inflates past {cap} bytes")
        return out
    return decompress


def _refuse(name: str) -> Callable[[bytes], bytes]:
    def decompress(body: bytes) -> bytes:
        raise ValueError(f"refused a {name}-compressed body: compression is off (DSPEX_ACCEPT_COMPRESSION)")
    return decompress


def decompressors(accept: bool, cap: int) -> dict[str, Callable[[bytes], bytes]]:
    """A decompressor per compression kombu knows: refusing, or (``accept``) bounded by ``cap`` bytes.

    A compression with no bounded decompressor here (brotli, zstd) is always refused.
    """
    bounded: dict[str, Callable[[], Any]] = {
        "application/x-gzip": zlib.decompressobj, "application/x-bz2": bz2.BZ2Decompressor,
        "application/x-lzma": lzma.LZMADecompressor}
    return {ctype: _bounded(bounded[ctype], cap) if accept and ctype in bounded else _refuse(ctype)
            for ctype in compression.encoders()}


def install_decompression(accept: bool, max_payload_bytes: int) -> None:
    """Replace kombu's decompressors in this process (kombu inflates a body before any Celery hook runs)."""
    for ctype, decode in decompressors(accept, body_cap(max_payload_bytes)).items():
        encoder, _ = compression.get_encoder(ctype)
        compression.register(encoder, decode, ctype)


# -- the consumer: every refusal is dead-lettered -----------------------------------------------------------------
def _record(message: Any, reason: str) -> dict[str, Any]:
    headers = getattr(message, "headers", None)
    headers = headers if isinstance(headers, dict) else {}
    task_id, task = headers.get("id"), headers.get("task")
    return {"task_id": task_id if isinstance(task_id, str) else None,
            "task": task if isinstance(task, str) else None, "reason": reason[:500]}


#: The longest a task event waits in the worker's buffer before it is published (with the others buffered).
EVENT_FLUSH_S = 0.1
#: A buffer this full is published at once.
EVENT_BUFFER = 500


def event_dispatcher(app: Any) -> Any:
    """This worker process's batched task-event dispatcher (the consumer's), or None: no consumer in this process
    (a prefork child, a client), or task events off."""
    found = getattr(app, "dspex_consumer", None)
    if not found or found[0] != os.getpid():
        return None
    dispatcher = getattr(found[1], "event_dispatcher", None)
    return dispatcher if dispatcher is not None and dispatcher.enabled else None


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, dead-lettering each message it refuses and batching task events (``worker_consumer``)."""

    _flush_pending = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Tasks send their own events (task-progress) through this consumer's batched dispatcher: in this process
        # only (a prefork child inherits the attribute, not a usable connection; :func:`event_dispatcher`).
        self.app.dspex_consumer = (os.getpid(), self)

    def on_send_event_buffered(self) -> None:
        if not self.hub:
            return super().on_send_event_buffered()  # type: ignore[no-any-return]
        dispatcher = self.event_dispatcher
        if dispatcher is not None and dispatcher.buffer_limit < EVENT_BUFFER:
            dispatcher.buffer_limit = EVENT_BUFFER
        if not self._flush_pending:  # the GIL orders this check: at most one flush is scheduled
            self._flush_pending = True
            self.hub.call_soon(self._schedule_flush)

    def _schedule_flush(self) -> None:  # on the hub's thread
        self.hub.call_later(EVENT_FLUSH_S, self._flush_buffered)

    def _flush_buffered(self) -> None:
        self._flush_pending = False  # first: an event buffered during the flush schedules the next one
        self._flush_events()

    def shutdown(self) -> None:
        try:
            self._flush_events()  # the last tasks' events, before the dispatcher closes without flushing
        except Exception as exc:  # noqa: BLE001 - shutting down: events are best effort
            log.warning("could not flush task events at shutdown: %s", exc)
        super().shutdown()

    @cached_property
    def _dead_letter_redis(self) -> Any:
        from ..connections import redis_client

        return redis_client(self.app.dspex_settings)

    def _set_aside(self, message: Any, reason: str, *, store_failure: bool = True) -> None:
        record = _record(message, reason)
        try:
            dead_letter(self._dead_letter_redis, self.app.dspex_settings.namespace, record)
            if store_failure and record["task_id"]:
                # No request: the stored failure holds no args or kwargs, however large the message was.
                self.app.backend.mark_as_failure(
                    record["task_id"], DeadLettered(f"message refused by the worker: {record['reason']}"))
        except Exception:  # a refusal must never end the worker; Celery still acks the message
            log.exception("could not dead-letter refused message %s", record["task_id"])

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self._set_aside(message, f"cannot decode: {exc}")
        super().on_decode_error(message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._set_aside(message, f"invalid task message: {exc}")
        super().on_invalid_task(body, message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._set_aside(message, "unknown message format (no task header)", store_failure=False)
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        # Celery records NotRegistered itself, but only when the headers carry an id.
        self._set_aside(message, f"unknown task: {exc}", store_failure=False)
        if check_headers(message.headers) is None:
            super().on_unknown_task(body, message, exc)
        else:
            message.reject_log_error(log, self.connection_errors)
