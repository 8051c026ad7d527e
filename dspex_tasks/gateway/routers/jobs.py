"""Jobs: the recent ones a key submitted (admin: every key's), and by id their state and result, a Server-Sent
Events stream of their live events, and cancellation (the submitting key's only; admin's too)."""

from __future__ import annotations

import asyncio
import functools
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from ... import live
from ..models import ID_PATTERN, JOB_EVENT_TYPES, how_to_follow, ref, sse_item_schema
from ..results import READY, JobSummary
from ..scopes import Access
from ..sse import KEEPALIVE_S, event_stream, job_events, last_event_id
from ..state import Gateway
from .access import ReadableJob, ReadKey, WritableJob, WriteKey, check_session, job_visible
from .common import GatewayDep, json_doc

__all__ = ["recent_jobs", "router"]

router = APIRouter()

#: How long a follower of a job that had already ended waits on its stream before its stored result answers.
_ENDED_BLOCK_MS = 20

_JOB_SSE: dict[int | str, dict[str, Any]] = {200: {
    "description": (
        "The job's live events (ARCHITECTURE 3.6), replayed from the start, then live, until its 'result' or "
        "'error' event, after which the server closes the stream. Each is one frame: 'id:' its stream entry id, "
        "'event:' its type (status, step, tool, token, result, error), 'data:' the event JSON (with 'type', 'id' "
        f"and 'ts'). A comment line (': keepalive') comes every {KEEPALIVE_S:g} s of quiet.\n\n"
        "A job submitted without \"stream\": true (or whose stream expired) writes no live events: its stream "
        "ends with a 'result' or 'error' event built from its stored result (the same 'result' and 'error' as "
        "GET /v1/jobs/{id}; id null, and no SSE id), and until the job has written a live event, a 'state' "
        "event ({type: state, state}, no SSE id) reports each change of its Celery state (PENDING, STARTED, "
        "RETRY), as this stream did before live events existed.\n\n"
        "Resuming: a client that loses the connection reconnects with the header 'Last-Event-ID: <the last id "
        "it saw>' (EventSource does so by itself) and gets exactly the events after it; an empty one starts "
        "over, a malformed one is a 422 problem before the stream starts. Close the EventSource on the 'result' "
        "or 'error' event: reconnecting after it would answer the final event again."),
    "content": {"text/event-stream": {"itemSchema": sse_item_schema(ref("JobEvent"), list(JOB_EVENT_TYPES))}}}}

_CANCEL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"id": {"type": "string"},
                   "cancelled": {"type": "boolean", "description": "false: the job had already finished"}},
    "required": ["id", "cancelled"]}


#: A signature name (``signature()``'s rule; the length is given apart, as for ids).
_SIGNATURE_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]*$"
_MAX_LIMIT = 200


async def recent_jobs(gw: Gateway, access: Access, *, limit: int, session: str | None = None,
                      signature: str | None = None) -> list[JobSummary]:
    """The recent jobs ``access`` may see (the API's list and the console's): an admin key reads the fleet index;
    any other key its own, each job checked as when it is read by id (:func:`job_visible`), so a job in a
    session the key lost drops out."""
    if access.scopes.admin:
        return await gw.jobs.recent(None, limit=limit, session=session, signature=signature)
    return await gw.jobs.recent(access.key_id, limit=limit, session=session, signature=signature,
                                visible=functools.partial(job_visible, access))


@router.get("/v1/jobs", tags=["jobs"], summary="Recent jobs, newest first, with their state",
            description="The jobs this key submitted through the gateway or the console (an admin key: every key's), "
                        "newest first, while their results are kept; a job whose session is no longer in the key's "
                        "scope is left out. Jobs submitted with the Python client directly are not listed. "
                        "'session' and 'signature' filter; a filtered list looks at the newest 10 x 'limit' jobs "
                        "only. Naming a session outside the key's scope is 403. Each job's result: "
                        "GET /v1/jobs/{job_id}.",
            responses=json_doc("JobList"))
async def list_jobs(gw: GatewayDep, access: ReadKey,
                    limit: Annotated[int, Query(ge=1, le=_MAX_LIMIT, description="the most jobs to list")] = 50,
                    session: Annotated[str | None, Query(min_length=1, max_length=128, pattern=ID_PATTERN,
                                                         description="only this session's jobs")] = None,
                    signature: Annotated[str | None, Query(min_length=1, max_length=64, pattern=_SIGNATURE_PATTERN,
                                                           description="only this signature's jobs")] = None,
                    ) -> JSONResponse:
    if session is not None:
        check_session(access, session)  # naming a session out of scope is a 403, as on every route
    return JSONResponse({"jobs": await recent_jobs(gw, access, limit=limit, session=session, signature=signature)})


@router.get("/v1/jobs/{job_id}", tags=["jobs"], summary="A job's state and, once done, its result",
            responses=json_doc("Job"))
async def get_job(job: ReadableJob, gw: GatewayDep) -> JSONResponse:
    return JSONResponse(gw.job_view(job.id, job.record, job.meta))


@router.get("/v1/jobs/{job_id}/events", tags=["jobs"], responses=_JOB_SSE, response_class=Response,
            summary="Server-Sent Events: the job's live events (tokens, steps, tool calls), then its result",
            description="A text/event-stream of the job's events (each frame's data: a JobEvent), from the start "
                        "or after the header Last-Event-ID, until its result or error; submit with \"stream\": "
                        "true for tokens, steps and tool calls.\n\n" + how_to_follow("/v1/jobs/{job_id}/events",
                                                                                  "JobEvent"))
async def job_stream(job: ReadableJob, request: Request, gw: GatewayDep) -> Response:
    after = last_event_id(request.headers)  # a 422 now: XREAD would fail mid-response
    ended = job.meta is not None and job.meta.get("status") in READY  # its stream, if any, is complete
    return event_stream(job_events(gw.aredis, gw.settings.namespace, job.id, after=after, reader=gw.jobs,
                                   view=lambda meta: gw.job_view(job.id, job.record, meta),
                                   block_ms=_ENDED_BLOCK_MS if ended else 1000))


@router.post("/v1/jobs/{job_id}/cancel", status_code=202, tags=["jobs"], response_class=JSONResponse,
             summary="Stop a job: a queued one when a worker takes it, a running one before its next LM or tool call",
             description="The job ends as Cancelled (its error code 'cancelled'); an LM call already in flight "
                         "finishes first. Needs the 'write' right (on the job's session, which a job this key "
                         "submitted is in). 'cancelled' is false when the job had already finished.",
             responses={202: {"description": "Cancel requested (or the job had already finished)",
                              "content": {"application/json": {"schema": _CANCEL_SCHEMA}}}})
async def cancel_job(job: WritableJob, access: WriteKey, gw: GatewayDep) -> JSONResponse:
    meta = await gw.jobs.meta(job.id)
    if meta is not None and meta.get("status") in READY:
        return JSONResponse({"id": job.id, "cancelled": False}, status_code=202)
    # live.request_cancel takes a synchronous client (the gateway's Client has one): off the event loop
    await asyncio.to_thread(live.request_cancel, gw.client.redis, gw.settings.namespace, job.id,
                            ttl_s=gw.settings.result_expires_s, reason=f"cancelled through the gateway by key "
                                                                       f"{access.key_id}")
    return JSONResponse({"id": job.id, "cancelled": True}, status_code=202)
