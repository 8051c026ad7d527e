"""Optimization runs: start, list, get, cancel, the candidate, and a Server-Sent Events stream of a run's progress.

A run with a session is seen by every key with that session in scope (``read``; starting and cancelling need
``write``); a dry run (no session) by the key that started it; admin sees every run. A run the key may not see
is 404, as an unknown one. A named dataset must match one of the key's session patterns.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from ... import keys
from ...errors import DatasetNotFound
from ..models import OPEN_OBJECT, OptimizationRequest, RunList, how_to_follow, ref, sse_item_schema
from ..problems import Problem
from ..scopes import Access
from ..sse import event_stream, last_event_id, run_events
from ..state import Gateway
from .access import RUN_KEY_FIELD, ReadableRun, ReadKey, WritableRun, WriteKey, check_session, run_visible
from .common import GatewayDep, json_doc

__all__ = ["router"]

router = APIRouter()

_RUN_SSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "One event per progress step (data: a RunEvent; id: its stream entry id), replayed from the "
                   "start, then live; the last has stage done, failed or cancelled, after which the server closes "
                   "the stream. Reconnect with Last-Event-ID to resume (a malformed one is 422; an empty one starts "
                   "over).",
    "content": {"text/event-stream": {"itemSchema": sse_item_schema(ref("RunEvent"))}}}}


@router.post("/v1/optimizations", status_code=202, tags=["optimizations"], response_class=JSONResponse,
             summary="Start an optimization run",
             description="The body names the signature (its rows are typed by that signature's inputs) and gives "
                         "a trainset or a dataset, not both: neither or both is a 422 problem naming 'trainset' or "
                         "'dataset'. Follow the run with GET /v1/optimizations/{run_id}/events.",
             responses={202: {"description": "Started", "content": {"application/json": {"schema": ref("Run")}},
                              "headers": {"Location": {"schema": {"type": "string"}}}}})
def start_optimization(body: OptimizationRequest, gw: GatewayDep, access: WriteKey) -> JSONResponse:
    check_session(access, body.session)
    if body.dataset is not None:
        check_session(access, body.dataset, what="dataset")
    if body.dataset is not None and body.trainset is None and body.dataset not in gw.client.datasets.list():
        raise Problem(404, DatasetNotFound.code, f"no dataset '{body.dataset}'",
                      errors=[{"field": "dataset", "message": "no such dataset", "pointer": "/dataset"}])
    run = gw.client.optimize(body.signature, body.trainset, body.valset, metric=body.metric,
                             optimizer=body.optimizer, session=body.session, program=body.program,
                             params=body.params, dataset=body.dataset)
    gw.client.runs.update(run.id, **{RUN_KEY_FIELD: access.key_id})  # a dry run is this key's alone
    return JSONResponse(run.status(), status_code=202, headers={"Location": f"/v1/optimizations/{run.id}"})


@router.get("/v1/optimizations", response_model=RunList, tags=["optimizations"],
            summary="Recent run ids (of one session, if given)")
def list_optimizations(gw: GatewayDep, access: ReadKey,
                       session: Annotated[str | None, Query(min_length=1, max_length=128,
                                                            pattern=r"^[A-Za-z0-9._:-]+$")] = None,
                       limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> RunList:
    if session is not None:
        check_session(access, session)
    if session is not None or access.scopes.admin:
        return RunList(items=gw.client.runs.ids(session, limit))
    return RunList(items=_visible_run_ids(gw, access, limit))


_PAGE = 500
_MAX_SCANNED = 20_000


def _visible_run_ids(gw: Gateway, access: Access, limit: int) -> list[str]:
    """The newest ``limit`` runs the key may see, from the newest ``_MAX_SCANNED`` of all sessions."""
    r, ns = gw.client.redis, gw.settings.namespace
    out: list[str] = []
    for start in range(0, _MAX_SCANNED, _PAGE):
        ids = [i.decode() if isinstance(i, bytes) else str(i)
               for i in r.zrevrange(keys.runs(ns), start, start + _PAGE - 1)]
        pipe = r.pipeline(transaction=False)
        for run_id in ids:
            pipe.hmget(keys.run(ns, run_id), "session", RUN_KEY_FIELD)
        for run_id, (session, key_id) in zip(ids, pipe.execute(), strict=True):
            if session is None:  # the record expired
                continue
            if run_visible(access, json.loads(session) or None, json.loads(key_id) if key_id else None):
                out.append(run_id)
                if len(out) == limit:
                    return out
        if len(ids) < _PAGE:
            break
    return out


@router.get("/v1/optimizations/{run_id}", tags=["optimizations"], response_class=JSONResponse,
            summary="A run's record: status, stage, scores, and the summary once done", responses=json_doc("Run"))
def get_optimization(run: ReadableRun) -> JSONResponse:
    return JSONResponse(run.to_json())


_CANDIDATE_SCHEMA: dict[str, Any] = {
    "type": "object", "title": "Candidate",
    "description": "The compiled candidate (promoted or not); store it with PUT /v1/sessions/{session}/programs/{program}",
    "properties": {"run_id": {"type": "string"}, "signature": {"type": "string"}, "program": {"type": "string"},
                   "promoted": {"type": ["boolean", "null"]},
                   "state": {**OPEN_OBJECT, "description": "DSPy dump_state() JSON"}},
    "required": ["run_id", "signature", "program", "state"]}


@router.get("/v1/optimizations/{run_id}/candidate", tags=["optimizations"], response_class=JSONResponse,
            summary="The run's compiled candidate program state (404 until the compile stage finished)",
            responses={200: {"description": "The candidate",
                             "content": {"application/json": {"schema": _CANDIDATE_SCHEMA}}}})
def get_optimization_candidate(rec: ReadableRun, gw: GatewayDep) -> JSONResponse:
    state = gw.client.runs.candidate(rec.run_id)  # NotFound until compiled: 404
    return JSONResponse({"run_id": rec.run_id, "signature": rec.signature, "program": rec.program,
                         "promoted": (rec.summary or {}).get("promoted"), "state": state})


@router.post("/v1/optimizations/{run_id}/cancel", status_code=202, tags=["optimizations"],
             response_class=JSONResponse, summary="Stop a run at its next stage boundary",
             responses={202: {"description": "Cancel requested",
                              "content": {"application/json": {"schema": ref("Run")}}}})
def cancel_optimization(rec: WritableRun, gw: GatewayDep) -> JSONResponse:
    run = gw.client.run(rec.run_id)
    run.cancel()
    return JSONResponse(run.status(), status_code=202)


@router.get("/v1/optimizations/{run_id}/events", tags=["optimizations"], responses=_RUN_SSE, response_class=Response,
            summary="Server-Sent Events: every progress event from the start, then live, until the run ends",
            description="A text/event-stream of the run's progress (each frame's data: a RunEvent), from the start "
                        "or after the header Last-Event-ID, until its last stage (done, failed or cancelled).\n\n"
                        + how_to_follow("/v1/optimizations/{run_id}/events", "RunEvent"))
async def optimization_events(rec: ReadableRun, request: Request, gw: GatewayDep) -> Response:
    after = last_event_id(request.headers)  # a 422 now: XREAD would fail mid-response
    return event_stream(run_events(gw.aredis, gw.settings.namespace, rec.run_id, after))
