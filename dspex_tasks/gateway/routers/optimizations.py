"""Optimization runs: start, list, get, cancel, the candidate, and a Server-Sent Events stream of a run's progress."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ...errors import DatasetNotFound, ValidationError
from ..models import OptimizationRequest, RunIdPath, RunList
from ..openapi import RUN_EVENT_SCHEMA, ref, sse_schema
from ..problems import Problem
from ..sse import event_stream, parse_stream_id, run_events
from .common import GatewayDep, json_doc

__all__ = ["router"]

router = APIRouter()

_RUN_SSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "One event per progress step (data: a run event); the last has stage done, failed or cancelled. "
                   "Reconnect with Last-Event-ID to resume (a malformed one is 422; an empty one starts over).",
    "content": {"text/event-stream": {"schema": sse_schema(RUN_EVENT_SCHEMA)}}}}


@router.post("/v1/optimizations", status_code=202, tags=["optimizations"], response_class=JSONResponse,
             summary="Start an optimization run",
             responses={202: {"description": "Started", "content": {"application/json": {"schema": ref("Run")}},
                              "headers": {"Location": {"schema": {"type": "string"}}}}})
def start_optimization(body: OptimizationRequest, gw: GatewayDep) -> JSONResponse:
    if body.dataset is not None and body.trainset is None and body.dataset not in gw.client.datasets.list():
        raise Problem(404, DatasetNotFound.code, f"no dataset '{body.dataset}'",
                      errors=[{"field": "dataset", "message": "no such dataset", "pointer": "/dataset"}])
    run = gw.client.optimize(body.signature, body.trainset, body.valset, metric=body.metric,
                             optimizer=body.optimizer, session=body.session, program=body.program,
                             params=body.params, dataset=body.dataset)
    return JSONResponse(run.status(), status_code=202, headers={"Location": f"/v1/optimizations/{run.id}"})


@router.get("/v1/optimizations", response_model=RunList, tags=["optimizations"],
            summary="Recent run ids (of one session, if given)")
def list_optimizations(gw: GatewayDep,
                       session: Annotated[str | None, Query(min_length=1, max_length=128,
                                                            pattern=r"^[A-Za-z0-9._:-]+$")] = None,
                       limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> RunList:
    return RunList(items=gw.client.runs.ids(session, limit))


@router.get("/v1/optimizations/{run_id}", tags=["optimizations"], response_class=JSONResponse,
            summary="A run's record: status, stage, scores, and the summary once done", responses=json_doc("Run"))
def get_optimization(run_id: RunIdPath, gw: GatewayDep) -> JSONResponse:
    return JSONResponse(gw.client.runs.get(run_id).to_json())


_CANDIDATE_SCHEMA: dict[str, Any] = {
    "type": "object", "title": "Candidate",
    "description": "The compiled candidate (promoted or not); store it with PUT /v1/sessions/{session}/programs/{program}",
    "properties": {"run_id": {"type": "string"}, "signature": {"type": "string"}, "program": {"type": "string"},
                   "promoted": {"type": ["boolean", "null"]},
                   "state": {"type": "object", "description": "DSPy dump_state() JSON"}},
    "required": ["run_id", "signature", "program", "state"]}


@router.get("/v1/optimizations/{run_id}/candidate", tags=["optimizations"], response_class=JSONResponse,
            summary="The run's compiled candidate program state (404 until the compile stage finished)",
            responses={200: {"description": "The candidate",
                             "content": {"application/json": {"schema": _CANDIDATE_SCHEMA}}}})
def get_optimization_candidate(run_id: RunIdPath, gw: GatewayDep) -> JSONResponse:
    state = gw.client.runs.candidate(run_id)  # RunNotFound, NotFound: 404
    rec = gw.client.runs.get(run_id)
    return JSONResponse({"run_id": run_id, "signature": rec.signature, "program": rec.program,
                         "promoted": (rec.summary or {}).get("promoted"), "state": state})


@router.post("/v1/optimizations/{run_id}/cancel", status_code=202, tags=["optimizations"],
             response_class=JSONResponse, summary="Stop a run at its next stage boundary",
             responses={202: {"description": "Cancel requested",
                              "content": {"application/json": {"schema": ref("Run")}}}})
def cancel_optimization(run_id: RunIdPath, gw: GatewayDep) -> JSONResponse:
    run = gw.client.run(run_id)
    run.cancel()
    return JSONResponse(run.status(), status_code=202)


@router.get("/v1/optimizations/{run_id}/events", tags=["optimizations"], responses=_RUN_SSE, response_class=Response,
            summary="Server-Sent Events: every progress event from the start, then live, until the run ends")
async def optimization_events(run_id: RunIdPath, request: Request, gw: GatewayDep) -> Response:
    try:  # 422 before the stream starts: XREAD would fail mid-response
        after = parse_stream_id(request.headers.get("last-event-id"))
    except ValidationError as exc:
        raise Problem(422, exc.code, exc.message, errors=[
            {**e, "pointer": "header:last-event-id"} for e in exc.errors]) from None
    await run_in_threadpool(gw.client.runs.get, run_id)  # 404 before the stream starts
    return event_stream(run_events(gw.aredis, gw.settings.namespace, run_id, after))
