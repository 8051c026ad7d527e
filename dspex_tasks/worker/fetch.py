"""A Redis broker transport that cannot lose a message between fetch and acknowledgement bookkeeping.

kombu's Redis transport takes a message with ``BRPOP`` and only afterwards, from Python, records it in
the ``unacked`` hash that brings it back if its worker dies: a worker killed in between (a SIGKILL, the
OOM killer, a node lost) loses the message for good, and its client sees only a timeout (issue 13: 6 of
20 kills timed at fetch lost one). This transport closes the window and two smaller ones:

* **Fetch** is one Lua script: pop waiting messages (queues and priorities in kombu's order; up to
  :data:`FETCH_BATCH` in one call under a backlog, never past the prefetch limit) and record each in
  ``unacked``/``unacked_index`` in the same atomic step, so at every instant a message is in its queue or
  in the unacked hash, never in a process's memory only. kombu's own restore brings an
  unacked message back after the visibility timeout. An entry that is not a kombu message (not JSON, no
  delivery tag) is moved whole to the dead-letter list by the same script instead of crashing every
  consumer that pops it; one whose body does not decode is set aside from Python before kombu sees it.
* **Waiting** for work without taking it: with nothing to fetch, the channel blocks on
  ``BLMOVE q q RIGHT RIGHT <wait>`` (a pop and push back to the same end of the same list, atomic: the
  entry never leaves it) on the first queue of its fair cycle, then fetches again; other queues are
  looked at every ``fetch_wait_s`` (0.2 s). There is no multi-key blocking move in Redis, hence this.
* **Visibility**: a living worker re-stamps, every quarter of the visibility timeout, every message it
  holds (running, prefetched, or waiting for its countdown), so kombu never redelivers a message whose
  worker is alive (no prediction runs twice at once, however long it takes; no countdown longer than
  the timeout loops); a dead worker's messages come back one visibility timeout after its last stamp.
* **Acks** go out promptly: Celery hands a thread's ack to the event loop, which kombu 5.7 wakes from
  the other thread (under a millisecond); on an older kombu, which does not, the loop would sleep until
  its next timer (acks lagged results by up to 3.5 s under the threads pool, so a kill re-ran finished
  work), and a timer wakes it every ``ACK_TICK_S``.

Queues consumed without acknowledgements (Celery's reply queues) and a ``global_keyprefix`` use kombu's
own path. Selected by ``celery_config`` for Redis brokers unless ``DSPEX_RELIABLE_FETCH=0``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from functools import partial
from time import monotonic
from typing import Any

from kombu.transport import redis as _kredis
from kombu.transport import virtual as _virtual
from kombu.utils import encoding as _encoding
from kombu.utils import json as _json
from redis.exceptions import ResponseError

from ..connections import lua
from .storefull import forget_unacked, requeue_unacked

__all__ = ["ACK_TICK_S", "FETCH_BATCH", "FETCH_SCRIPT", "Channel", "QoS", "Transport"]

log = logging.getLogger(__name__)

kredis: Any = _kredis  # kombu is untyped: its classes and helpers are Any here
virtual: Any = _virtual
bytes_to_str: Any = _encoding.bytes_to_str
loads: Any = _json.loads

#: The longest an acknowledgement (or another call handed to the event loop) waits for the loop to wake.
ACK_TICK_S = 0.05
#: The most messages one fetch takes (one Lua call) when the prefetch limit leaves room for them.
FETCH_BATCH = 16

#: The fetch script (``lua/fetch.lua``): KEYS are the queue keys in fetch order, then unacked, unacked_index and
#: the dead-letter list; ARGV[1] is now. It returns ``{key, item, tag}``, tag "" when the entry was set aside.
FETCH_SCRIPT = lua(__name__, "fetch")

_BASE64 = re.compile(r"[A-Za-z0-9+/\r\n]*={0,2}\s*")


def _bad_payload(payload: Any) -> str | None:
    """Why kombu could not build a message from ``payload`` (None: it can)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("properties"), dict):
        return "not a message: no properties"
    props = payload["properties"]
    if not isinstance(props.get("delivery_info"), dict):
        return "not a message: no delivery_info"
    if payload.get("headers") is not None and not isinstance(payload["headers"], dict):
        return "not a message: headers are not an object"
    body, encoding = payload.get("body"), props.get("body_encoding")
    if body and encoding and str(encoding).lower() != "utf-8":
        if str(encoding).lower() != "base64":
            return f"unknown body_encoding {str(encoding)[:40]!r}"
        if not isinstance(body, str) or not _BASE64.fullmatch(body):
            return "body_encoding is base64 but the body is not base64"
    return None


class QoS(kredis.QoS):  # type: ignore[misc]
    """kombu's Redis QoS, for messages the fetch script already recorded, and keeping held ones visible."""

    def append(self, message: Any, delivery_tag: str) -> None:
        if getattr(self.channel, "_recorded", None) == delivery_tag:
            virtual.QoS.append(self, message, delivery_tag)  # recorded with the pop: in memory only
            return
        super().append(message, delivery_tag)

    # A full Redis (maxmemory, noeviction) refuses kombu's MULTI ack and restore as a whole, and the refusal
    # ended the worker from its event loop: these go through writes a full Redis accepts (worker/storefull.py).
    def ack(self, delivery_tag: str) -> None:
        with self.channel.conn_or_acquire() as client:
            forget_unacked(client, self.unacked_key, self.unacked_index_key, delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.restore_by_tag(delivery_tag, leftmost=True)
        else:
            with self.channel.conn_or_acquire() as client:
                forget_unacked(client, self.unacked_key, self.unacked_index_key, delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        if not requeue_unacked(self, tag, leftmost=leftmost):
            # already acknowledged or restored, or bound to no queue (which kombu's restore drops too)
            with self.channel.conn_or_acquire(client) as conn:
                forget_unacked(conn, self.unacked_key, self.unacked_index_key, tag)

    def extend_visibility(self) -> int:
        """Re-stamp every message this channel holds unacknowledged; returns how many."""
        held = [tag for tag in list(self._delivered) if tag not in self._dirty]
        if held:
            now = time.time()
            with self.channel.conn_or_acquire() as client:
                client.zadd(self.unacked_index_key, dict.fromkeys(held, now), xx=True)
        return len(held)


class Channel(kredis.Channel):  # type: ignore[misc]
    """kombu's Redis channel with an atomic fetch (see the module)."""

    QoS = QoS
    #: Where a queue entry that is not a message goes (``celery_config`` sets the namespace's list).
    dead_letter_key = "dspex:deadletter"
    #: The longest a queue other than the first of the cycle waits to be looked at when all are empty.
    fetch_wait_s = 0.2
    from_transport_options = kredis.Channel.from_transport_options + ("dead_letter_key", "fetch_wait_s")

    _recorded: str | None = None
    _fetch_cmd: str | None = None
    _found = True  # the last fetch took a message: fetch again at once, else wait first
    _can_blmove = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._no_ack_queues: set[str] = set()
        super().__init__(*args, **kwargs)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        ret = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._no_ack_queues.discard(queue)
        return ret

    @property
    def _reliable(self) -> bool:
        return not self.global_keyprefix and not self._no_ack_queues

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self._reliable:
            self._fetch_cmd = None
            return super()._brpop_start(timeout)  # type: ignore[no-any-return]
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = monotonic()
        wait = max(0.01, min(float(self.fetch_wait_s), float(timeout or self.fetch_wait_s)))
        if self._found:
            keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
            self._fetch_cmd = "EVAL"
            connection.send_command("EVAL", FETCH_SCRIPT, len(keys) + 3, *keys, self.unacked_key,
                                    self.unacked_index_key, self.dead_letter_key, repr(time.time()),
                                    self._batch_size())
        elif self._can_blmove:
            first = self._q_for_pri(queues[0], 0)
            self._fetch_cmd = "BLMOVE"  # wakes when the first queue has an entry, and leaves it there
            connection.send_command("BLMOVE", first, first, "RIGHT", "RIGHT", wait)
        else:  # Redis before 6.2: a plain wait on a key nobody writes
            self._fetch_cmd = "BLPOP"
            connection.send_command("BLPOP", f"{self.dead_letter_key}:never", wait)
        return None

    def _batch_size(self) -> int:
        """How many messages one fetch takes: up to :data:`FETCH_BATCH`, never past the prefetch limit."""
        room = self.qos.can_consume_max_estimate()
        return max(1, min(FETCH_BATCH, FETCH_BATCH if room is None else int(room)))

    def _brpop_read(self, **options: Any) -> Any:
        cmd = self._fetch_cmd
        if cmd is None:
            return super()._brpop_read(**options)
        try:
            try:
                reply = self.client.parse_response(self.client.connection, cmd, **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next poll reconnects
                raise
            except ResponseError:
                if cmd != "BLMOVE":
                    raise
                self._can_blmove = False
                reply = None
            if cmd != "EVAL" or not reply:
                self._found = cmd != "EVAL"  # after a wait, fetch; after an empty fetch, wait
                raise virtual.Empty()
            self._found = True
            parts = [bytes_to_str(part) for part in reply]
            delivered, failure = 0, None
            for i in range(0, len(parts) - 2, 3):
                key, item, tag = parts[i], parts[i + 1], parts[i + 2]
                dest = key.rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(dest)
                if not tag:
                    log.warning("set aside an entry of queue %s that is not a message (see `dspex deadletters`)",
                                dest)
                    continue
                try:  # every message of the batch is recorded unacked: each must reach the consumer
                    self._deliver_recorded(item, tag, dest)
                    delivered += 1
                except virtual.Empty:
                    continue
                except Exception as exc:  # noqa: BLE001 - delivered after the others, re-raised below
                    failure = failure or exc
            if failure is not None:
                raise failure
            if not delivered:
                raise virtual.Empty()
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _deliver_recorded(self, item: str, tag: str, queue: str) -> None:
        try:
            payload = loads(item)
        except ValueError:
            payload = None
        reason = _bad_payload(payload)
        if reason is not None:
            self._set_aside(payload, tag, queue, reason)
            raise virtual.Empty()
        self._recorded = tag
        try:
            self.connection._deliver(payload, queue)
        finally:
            self._recorded = None

    def _set_aside(self, payload: Any, tag: str, queue: str, reason: str) -> None:
        headers = payload.get("headers") if isinstance(payload, dict) else None
        headers = headers if isinstance(headers, dict) else {}
        record = {"task_id": headers.get("id"), "task": headers.get("task"), "queue": queue, "reason": reason,
                  "at": time.time()}
        try:
            with self.conn_or_acquire() as client:
                pipe = client.pipeline()
                pipe.lpush(self.dead_letter_key, json.dumps(record, default=str))
                pipe.ltrim(self.dead_letter_key, 0, 9999)
                pipe.zrem(self.unacked_index_key, tag)
                pipe.hdel(self.unacked_key, tag)
                pipe.execute()
        except ResponseError as exc:  # a full Redis: it stays unacked, restored and set aside later
            log.warning("could not set aside a message of queue %s (%s): %s", queue, reason, exc)
            return
        log.warning("set aside a message of queue %s: %s (see `dspex deadletters`)", queue, reason)


def _extend_visibility(cycle: Any) -> None:
    for channel in list(cycle._channels):
        qos = getattr(channel, "_qos", None)
        if isinstance(qos, QoS):
            try:
                qos.extend_visibility()
            except channel.connection_errors:
                log.debug("visibility extension skipped: broker connection lost", exc_info=True)
            except ResponseError as exc:  # a full Redis refuses ZADD: the next interval tries again
                log.debug("visibility extension skipped: %s", exc)


def _wake() -> None:
    """A timer that bounds the event loop's sleep, so calls handed to it (acks) run promptly."""


class Transport(kredis.Transport):  # type: ignore[misc]
    """kombu's Redis transport with :class:`Channel` and the timers of the module's promises."""

    Channel = Channel

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)
        cycle = self.cycle
        for attr in ("_dspex_visibility_tref", "_dspex_wake_tref"):
            old = getattr(cycle, attr, None)
            if old is not None:
                old.cancel()
        visibility = float(connection.client.transport_options.get("visibility_timeout", 3600))
        every = max(1.0, min(visibility / 4, 60.0))
        cycle._dspex_visibility_tref = loop.call_repeatedly(every, partial(_extend_visibility, cycle))
        if not hasattr(loop, "_create_waker"):  # kombu < 5.7: call_soon from a task thread does not wake the loop
            cycle._dspex_wake_tref = loop.call_repeatedly(ACK_TICK_S, _wake)
