"""Jobs by id: state and result, and a Server-Sent Events stream of state changes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..models import JobIdPath
from ..openapi import sse_schema
from ..sse import event_stream, job_events
from .common import GatewayDep, job_or_404, json_doc

__all__ = ["router"]

router = APIRouter()

_JOB_SSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "'state' events ({id, state}) on each change, then one 'done' event with the job",
    "content": {"text/event-stream": {"schema": sse_schema({"type": "object"}, ["state", "done"])}}}}


@router.get("/v1/jobs/{job_id}", tags=["jobs"], summary="A job's state and, once done, its result",
            responses=json_doc("Job"))
async def get_job(job_id: JobIdPath, gw: GatewayDep) -> JSONResponse:
    return JSONResponse(await job_or_404(gw, job_id))


@router.get("/v1/jobs/{job_id}/events", tags=["jobs"], responses=_JOB_SSE, response_class=Response,
            summary="Server-Sent Events: 'state' on each change, then 'done' with the job")
async def job_stream(job_id: JobIdPath, gw: GatewayDep) -> Response:
    record, _ = await gw.jobs.lookup(job_id)
    first = await job_or_404(gw, job_id)
    return event_stream(job_events(gw.jobs, job_id, lambda meta: gw.job_view(job_id, record or first, meta)))
