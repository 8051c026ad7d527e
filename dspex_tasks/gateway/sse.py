"""Server-Sent Events: an optimization run's progress (replayed from the start, then live) and a job's states.

Run events come from the run's Redis Stream (``keys.run_events``), read with async ``XREAD BLOCK``, so a
follower holds no thread. Each event's SSE ``id`` is its stream entry id: a client that reconnects with
``Last-Event-ID`` resumes after the last event it saw. The stream ends after the run's last event
(``stage`` ``done``, ``failed`` or ``cancelled``); a job's stream ends once the job is ready.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse

from .. import keys
from ..errors import ValidationError
from ..optimize.runs import END_STAGES, TERMINAL
from .results import READY, JobReader

__all__ = ["format_event", "parse_stream_id", "run_events", "job_events", "event_stream", "KEEPALIVE_S"]

KEEPALIVE_S = 15.0
_STREAM_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_U64_MAX = 2**64 - 1


def parse_stream_id(value: str | None) -> str:
    """The Redis stream id ``<ms>-<seq>`` a ``Last-Event-ID`` header names (``"0-0"``, the start, when empty).

    Checked before the response starts: a bad id that reached ``XREAD`` would cut a 200 stream mid-response.

    Raises:
        ValidationError: not ``<ms>-<seq>`` with both parts at most 2**64-1.
    """
    if value is None or not value.strip():
        return "0-0"
    m = _STREAM_ID.fullmatch(value.strip())
    if m is None or int(m.group(1)) > _U64_MAX or int(m.group(2)) > _U64_MAX:
        raise ValidationError.from_errors("Last-Event-ID", [{
            "field": "Last-Event-ID", "message": f"{value[:60]!r} is not a stream id <ms>-<seq> (each 0..2**64-1)"}])
    return f"{int(m.group(1))}-{int(m.group(2))}"


def format_event(data: Any, *, event: str | None = None, event_id: str | None = None) -> bytes:
    lines = []
    if event_id:
        lines.append(f"id: {event_id}")
    if event:
        lines.append(f"event: {event}")
    lines.append("data: " + json.dumps(data, separators=(",", ":"), default=str))
    return ("\n".join(lines) + "\n\n").encode()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def run_events(aredis: Any, namespace: str, run_id: str, after: str | None = None,
                     block_ms: int = 1000) -> AsyncIterator[bytes]:
    """SSE frames of a run's events from the start (or after ``after``, a :func:`parse_stream_id` result),
    until its last event."""
    stream = keys.run_events(namespace, run_id)
    last = after or "0-0"
    quiet_since = time.monotonic()
    yield b": stream of optimization run events\n\n"
    while True:
        reply = await aredis.xread({stream: last}, count=500, block=block_ms)
        if not reply:
            status = await aredis.hget(keys.run(namespace, run_id), "status")
            if status is None or json.loads(status) in TERMINAL:
                # the run ended (or expired): take what raced the status, then stop
                reply = await aredis.xread({stream: last}, count=500)
                if not reply:
                    return
            elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield b": keepalive\n\n"
                continue
            else:
                continue
        for _, entries in reply:
            for entry_id, fields in entries:
                last = _s(entry_id)
                raw = fields.get(b"e", fields.get("e"))
                event = json.loads(raw)
                quiet_since = time.monotonic()
                yield format_event(event, event_id=last)
                if event.get("stage") in END_STAGES:
                    return


async def job_events(reader: JobReader, job_id: str, view: Any) -> AsyncIterator[bytes]:
    """``state`` frames on each change, then one ``done`` frame with the job (result or error)."""
    yield b": stream of job states\n\n"
    last: str | None = None
    quiet_since = time.monotonic()
    async for meta in reader.follow(job_id, ticks=True):
        job = view(meta)
        if job["state"] in READY:
            yield format_event(job, event="done")
            return
        if job["state"] != last:
            last, quiet_since = job["state"], time.monotonic()
            yield format_event({"id": job_id, "state": last}, event="state")
        elif time.monotonic() - quiet_since >= KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield b": keepalive\n\n"


def event_stream(frames: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(frames, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
