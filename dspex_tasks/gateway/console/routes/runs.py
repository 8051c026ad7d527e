"""``/console/runs``: optimization runs by status, and a run's page: its stages and events, baseline against
candidate, the decision, LM calls and cost, a score chart the run's event stream (SSE) keeps growing, cancel."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from .... import keys
from ....errors import NotFound, RunNotFound
from ....optimize.compare import run_scores
from ....optimize.runs import END_STAGES, RunRecord, RunStatus
from ...routers.access import RUN_KEY_FIELD, run_visible
from ...routers.common import GatewayDep
from ...scopes import Right
from ...sse import event_stream, parse_stream_id, run_events
from ...state import Gateway
from ..auth import ConsoleUser, User, need
from ..data import visible_runs
from ..forms import check_same_origin
from ..render import SECURITY_HEADERS, fragment, page

__all__ = ["router"]

router = APIRouter()

STATUSES = [s.value for s in RunStatus]
#: The most events a run page renders (the chart and the table); SSE adds the later ones.
MAX_EVENTS = 2000


def _status(request: Request) -> str | None:
    value = request.query_params.get("status") or None
    return value if value in STATUSES else None


@router.get("/runs", include_in_schema=False)
def runs_page(request: Request, gw: GatewayDep, user: ConsoleUser) -> Response:
    need(user, Right.READ)
    status = _status(request)
    runs, counts = visible_runs(gw, user.access, status=status)
    return page(request, "runs.html", active="runs", runs=runs, counts=counts, status=status, statuses=STATUSES)


@router.get("/runs/table", include_in_schema=False)
def runs_table(request: Request, gw: GatewayDep, user: ConsoleUser) -> Response:
    need(user, Right.READ)
    status = _status(request)
    runs, counts = visible_runs(gw, user.access, status=status)
    return fragment(request, "_runs_table.html", runs=runs, counts=counts, status=status)


def _run(gw: Gateway, user: User, run_id: str, right: Right = Right.READ) -> RunRecord:
    need(user, right)
    rec: RunRecord = gw.client.runs.get(run_id)
    if not run_visible(user.access, rec.session or None, rec.extra.get(RUN_KEY_FIELD)):
        raise RunNotFound(f"no optimization run '{run_id}'")  # as for an unknown id
    return rec


def _events(gw: Gateway, run_id: str) -> list[dict[str, Any]]:
    entries = gw.client.redis.xrange(keys.run_events(gw.settings.namespace, run_id), count=MAX_EVENTS)
    out = []
    for entry_id, fields in entries:
        event = json.loads(fields.get(b"e", fields.get("e")))
        event["id"] = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        out.append(event)
    return out


def _stages(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage, in order: first and last event time, the last progress and score, the last message."""
    stages: dict[str, dict[str, Any]] = {}
    for e in events:
        row = stages.setdefault(str(e.get("stage")), {"stage": e.get("stage"), "started": e.get("ts"), "events": 0})
        row.update(ended=e.get("ts"), done=e.get("done"), total=e.get("total"), events=row["events"] + 1)
        if e.get("score") is not None:
            row["score"] = e["score"]
        if e.get("message"):
            row["message"] = e["message"]
    return list(stages.values())


def _summary(gw: Gateway, rec: RunRecord) -> dict[str, Any]:
    """What the summary block shows: scores side by side, the decision, spend, and the predictors' changes."""
    record = rec.to_json()
    changes: list[dict[str, Any]] = []
    try:
        default = (gw.signatures.get(rec.signature) or {}).get("instructions")
        changes = gw.client.run(rec.run_id).changes(default_instructions=default)
    except NotFound:  # no candidate yet
        pass
    return {"rec": rec, "scores": run_scores(record), "summary": rec.summary or {}, "changes": changes}


@router.get("/runs/{run_id}", include_in_schema=False)
def run_page(request: Request, run_id: str, gw: GatewayDep, user: ConsoleUser) -> Response:
    rec = _run(gw, user, run_id)
    events = _events(gw, run_id)
    ended = rec.status.terminal or any(e.get("stage") in END_STAGES for e in events)
    return page(request, "run.html", active="runs", events=events, stages=_stages(events), ended=ended,
                last_id=events[-1]["id"] if events else "0-0", can_write=user.can("write"), **_summary(gw, rec))


@router.get("/runs/{run_id}/summary", include_in_schema=False)
def run_summary(request: Request, run_id: str, gw: GatewayDep, user: ConsoleUser) -> Response:
    rec = _run(gw, user, run_id)
    return fragment(request, "_run_summary.html", **_summary(gw, rec))


@router.get("/runs/{run_id}/events", include_in_schema=False)
async def run_event_stream(request: Request, run_id: str, gw: GatewayDep, user: ConsoleUser) -> Response:
    """The run's events after ``?after=`` (or the browser's ``Last-Event-ID`` when it reconnects), then live."""
    await run_in_threadpool(_run, gw, user, run_id)
    after = parse_stream_id(request.headers.get("last-event-id") or request.query_params.get("after"))
    return event_stream(run_events(gw.aredis, gw.settings.namespace, run_id, after))


@router.post("/runs/{run_id}/cancel", include_in_schema=False)
def cancel_run(request: Request, run_id: str, gw: GatewayDep, user: ConsoleUser) -> Response:
    check_same_origin(request)
    rec = _run(gw, user, run_id, Right.WRITE)
    gw.client.run(rec.run_id).cancel()
    base = request.scope.get("root_path", "")
    return RedirectResponse(f"{base}/runs/{run_id}?done=cancel+requested", status_code=303, headers=SECURITY_HEADERS)

