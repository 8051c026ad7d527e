"""Jobs by id: state and result, and a Server-Sent Events stream of state changes (the submitting key's only)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..openapi import sse_schema
from ..sse import event_stream, job_events
from .access import ReadableJob
from .common import GatewayDep, json_doc

__all__ = ["router"]

router = APIRouter()

_JOB_SSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "'state' events ({id, state}) on each change, then one 'done' event with the job",
    "content": {"text/event-stream": {"schema": sse_schema({"type": "object"}, ["state", "done"])}}}}


@router.get("/v1/jobs/{job_id}", tags=["jobs"], summary="A job's state and, once done, its result",
            responses=json_doc("Job"))
async def get_job(job: ReadableJob, gw: GatewayDep) -> JSONResponse:
    return JSONResponse(gw.job_view(job.id, job.record, job.meta))


@router.get("/v1/jobs/{job_id}/events", tags=["jobs"], responses=_JOB_SSE, response_class=Response,
            summary="Server-Sent Events: 'state' on each change, then 'done' with the job")
async def job_stream(job: ReadableJob, gw: GatewayDep) -> Response:
    first = gw.job_view(job.id, job.record, job.meta)
    return event_stream(job_events(gw.jobs, job.id, lambda meta: gw.job_view(job.id, job.record or first, meta)))
