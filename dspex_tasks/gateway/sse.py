"""Server-Sent Events: an optimization run's progress and a job's live events, each replayed from the start
(or resumed), then live.

Both come from a Redis Stream (``keys.run_events``, ``keys.job_events``), read with async ``XREAD BLOCK``, so
a follower holds no thread. Each event's SSE ``id`` is its stream entry id: a client that reconnects with
``Last-Event-ID`` resumes after the last event it saw. A run's stream ends after its last event (``stage``
``done``, ``failed`` or ``cancelled``); a job's after its ``result`` or ``error`` event, which for a job that
wrote none (submitted without ``stream``, or its stream expired) is built from its stored result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from starlette.responses import StreamingResponse

from .. import keys, live
from ..errors import ResultLost, ValidationError
from ..optimize.runs import END_STAGES, TERMINAL
from .problems import Problem
from .results import READY, JobReader

__all__ = ["format_event", "parse_stream_id", "last_event_id", "run_events", "job_events", "JobIdle", "final_event",
           "event_stream", "KEEPALIVE_S"]

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


def last_event_id(headers: Mapping[str, str]) -> str:
    """The stream id a request's ``Last-Event-ID`` header names (:func:`parse_stream_id`), or a 422 problem,
    answered before the stream starts."""
    try:
        return parse_stream_id(headers.get("last-event-id"))
    except ValidationError as exc:
        raise Problem(422, exc.code, exc.message, errors=[
            {**e, "pointer": "header:last-event-id"} for e in exc.errors]) from None


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


class JobIdle:
    """The ``on_idle`` of a job's live events (:func:`dspex_tasks.live.aread_events`), asked after each quiet
    second: the job's final event, built from its stored result once it is ready (the view is
    ``Gateway.job_view``: the result and error of ``GET /v1/jobs/{id}``), and, until the job has written a live
    event (one submitted without ``stream`` never does), a ``state`` frame on each change of its Celery state.
    """

    def __init__(self, reader: JobReader, job_id: str, view: Callable[[dict[str, Any] | None], dict[str, Any]],
                 push: Callable[[bytes], Awaitable[None]]) -> None:
        self.reader = reader
        self.job_id = job_id
        self.view = view
        self.push = push
        self.streamed = False  # set once a live event came: the stream says the rest
        self.state: str | None = None

    async def __call__(self) -> dict[str, Any] | None:
        job = self.view(await self.reader.meta(self.job_id))
        final = final_event(job)
        if final is None and not self.streamed and job["state"] != self.state:
            self.state = job["state"]
            await self.push(format_event({"type": "state", "state": self.state, "id": None, "ts": time.time()},
                                         event="state"))
        return final


def final_event(job: dict[str, Any]) -> dict[str, Any] | None:
    """A ready job's last event from its view (``result`` or ``error``, shaped as ``GET /v1/jobs/{id}``
    shows them); None while it is not ready. It has no stream entry: its ``id`` is null."""
    if "result" in job:
        return {"type": "result", "result": job["result"], "id": None, "ts": time.time()}
    if "error" in job:
        return {"type": "error", "error": job["error"], "id": None, "ts": time.time()}
    if job["state"] in READY:  # SUCCESS with no prediction result: it expired, or the job is no prediction
        return {"type": "error", "error": {"type": "ResultLost", "code": ResultLost.code, "message": (
            f"job {job['id']} ended ({job['state']}) with no prediction result to show (expired, or not a "
            "prediction)")}, "id": None, "ts": time.time()}
    return None


async def job_events(aredis: Any, namespace: str, job_id: str, *, after: str, reader: JobReader,
                     view: Callable[[dict[str, Any] | None], dict[str, Any]], block_ms: int = 1000
                     ) -> AsyncIterator[bytes]:
    """SSE frames of a job's live events from the start (or after ``after``, a :func:`parse_stream_id` result),
    until its ``result`` or ``error``.

    Each event is a frame with ``id`` (its stream entry id; none for a final event built from the stored
    result), ``event`` (its type) and ``data`` (the event JSON); :class:`JobIdle` (with ``reader`` and
    ``view``) supplies the final event of a job that wrote none, and ``state`` frames. One task reads the
    events into a small queue (a slow client holds the reader back; nothing piles up) and the response reads
    the queue, so a quiet stream gets a keepalive comment every :data:`KEEPALIVE_S` without disturbing a
    blocked ``XREAD``.
    """
    frames: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=256)
    on_idle = JobIdle(reader, job_id, view, frames.put)

    async def read() -> None:
        try:
            async for event in live.aread_events(aredis, namespace, job_id, after=after, block_ms=block_ms,
                                                 on_idle=on_idle):
                on_idle.streamed = on_idle.streamed or event.get("id") is not None
                await frames.put(format_event(event, event=str(event.get("type")), event_id=event.get("id")))
        except Exception as exc:  # noqa: BLE001 - handed to the response, which ends the stream with it
            await frames.put(exc)
            return
        await frames.put(None)

    pump = asyncio.get_running_loop().create_task(read(), name=f"dspex-job-events-{job_id}")
    try:
        yield b": stream of job events\n\n"
        while True:
            try:
                frame = await asyncio.wait_for(frames.get(), KEEPALIVE_S)  # read now: tests shorten it
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            if frame is None:
                return
            if isinstance(frame, BaseException):
                raise frame
            yield frame
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump


def event_stream(frames: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(frames, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
