"""``/console/jobs``: a submit form generated from a signature's published input schema (``write``), then the job
followed live over SSE (tokens, steps, tool calls, then its result, usage and program version); below the form,
the key's recent jobs (admin: every key's), refreshed by htmx."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from .... import keys
from ....errors import InvalidId, JobNotFound, ValidationError
from ...problems import Problem
from ...routers.access import job_visible
from ...routers.common import GatewayDep
from ...routers.jobs import recent_jobs
from ...scopes import Right
from ...sse import event_stream, job_events, parse_stream_id
from ...state import Gateway
from ..auth import ConsoleUser, User, need, need_session
from ..forms import check_same_origin, form_fields, parse_inputs, read_form
from ..render import SECURITY_HEADERS, fragment, page

__all__ = ["router"]

router = APIRouter()

#: The most jobs the recent-jobs table shows.
RECENT_LIMIT = 50


async def _recent(request: Request, gw: Gateway, user: User) -> dict[str, Any]:
    """The recent-jobs table's values: its filters (``list_signature``, ``list_session``: apart from the form's
    ``signature``, which picks the form), the jobs, and the query that keeps the filters on each refresh.

    A filter that cannot match is said above the table rather than refused: the page stays usable."""
    signature = request.query_params.get("list_signature") or None
    session = (request.query_params.get("list_session") or "").strip() or None
    if signature is not None and signature not in gw.signatures:
        signature = None  # not published (any more): no filter, as the select offers none
    error = None
    if session is not None:
        bad = _bad_ids(session=session)
        if bad:
            error = bad[0]["message"]
        elif not user.access.scopes.allows(session):
            error = user.access.refuse_session(session)
    jobs = [] if error else await recent_jobs(gw, user.access, limit=RECENT_LIMIT, session=session,
                                              signature=signature)
    query = urlencode({k: v for k, v in (("list_signature", signature), ("list_session", session)) if v})
    return {"jobs": jobs, "list_signature": signature, "list_session": session, "list_error": error,
            "list_query": query}


async def _form(request: Request, gw: Gateway, user: User, name: str | None, values: dict[str, str] | None = None,
                errors: list[dict[str, str]] | None = None, status_code: int = 200) -> Response:
    names = sorted(gw.signatures)
    name = name if name in gw.signatures else (names[0] if names else None)
    desc = gw.signatures.get(name or "") or {}
    return page(request, "jobs.html", status_code=status_code, active="jobs", names=names, name=name, desc=desc,
                fields=form_fields(desc.get("input_schema") or {}), values=values or {}, errors=errors or [],
                **await _recent(request, gw, user))


@router.get("/jobs", include_in_schema=False)
async def jobs_page(request: Request, gw: GatewayDep, user: ConsoleUser) -> Response:
    need(user, Right.READ)
    await gw.reload()
    job_id = request.query_params.get("id", "").strip()
    if job_id:  # "follow a job by id"
        return RedirectResponse(f"{request.scope.get('root_path', '')}/jobs/{job_id}", status_code=303)
    return await _form(request, gw, user, request.query_params.get("signature"))


@router.get("/jobs/recent", include_in_schema=False)
async def recent_table(request: Request, gw: GatewayDep, user: ConsoleUser) -> Response:
    """The recent-jobs table alone (htmx refreshes it every few seconds); before ``/jobs/{job_id}``."""
    need(user, Right.READ)
    return fragment(request, "_jobs_table.html", **await _recent(request, gw, user))


@router.get("/jobs/fields", include_in_schema=False)
async def job_fields(request: Request, gw: GatewayDep, user: ConsoleUser) -> Response:
    """The form's fields for another signature (an htmx swap when the signature select changes)."""
    need(user, Right.READ)
    desc = gw.signatures.get(request.query_params.get("signature", "")) or {}
    return fragment(request, "_job_fields.html", desc=desc, fields=form_fields(desc.get("input_schema") or {}),
                    values={}, errors=[])


def _bad_ids(**ids: str | None) -> list[dict[str, str]]:
    errors = []
    for what, value in ids.items():
        try:
            if value is not None:
                keys.check_id(value, what)
        except InvalidId as exc:
            errors.append({"field": what, "message": str(exc)})
    return errors


@router.post("/jobs", include_in_schema=False)
async def submit(request: Request, gw: GatewayDep, user: ConsoleUser) -> Response:
    check_same_origin(request)
    need(user, Right.WRITE)
    form = await read_form(request)
    name = form.get("signature", "")
    desc = await gw.signature(name)  # UnknownSignature: the 404 page
    session = form.get("session", "").strip() or None
    program = form.get("program", "").strip() or None
    errors = _bad_ids(session=session, program=program)
    if errors:
        return await _form(request, gw, user, name, form, errors, status_code=422)
    need_session(user, session, Right.WRITE)
    inputs, errors = parse_inputs(desc.get("input_schema") or {}, form)
    if not errors:
        try:
            if program is not None and session is not None:
                await run_in_threadpool(gw.check_program, name, session, program)
            job = await gw.enqueue(gw.client.submit, name, inputs, session=session, program=program, stream=True,
                                   trace=True)  # the job page shows each predictor call's inputs and outputs
        except ValidationError as exc:
            errors = exc.errors or [{"field": "", "message": exc.message}]
        except Problem as exc:  # the program serves another signature
            errors = [{"field": "program", "message": exc.detail}]
    if errors:
        return await _form(request, gw, user, name, form, errors, status_code=422)
    await gw.jobs.record(job.id, name, user.key_id, session)
    return RedirectResponse(f"{request.scope.get('root_path', '')}/jobs/{job.id}", status_code=303,
                            headers=SECURITY_HEADERS)


async def _job(gw: Gateway, user: User, job_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    need(user, Right.READ)
    keys.check_id(job_id, "job")
    record, meta = await gw.jobs.lookup(job_id)
    if (record is None and meta is None) or not job_visible(user.access, record):
        raise JobNotFound(f"no job '{job_id}' (unknown, its result expired, or not this key's)")
    return record, meta


@router.get("/jobs/{job_id}", include_in_schema=False)
async def job_page(request: Request, job_id: str, gw: GatewayDep, user: ConsoleUser) -> Response:
    record, meta = await _job(gw, user, job_id)
    view = gw.job_view(job_id, record, meta)
    return page(request, "job.html", active="jobs", job=view, record=record or {})


@router.get("/jobs/{job_id}/events", include_in_schema=False)
async def job_event_stream(request: Request, job_id: str, gw: GatewayDep, user: ConsoleUser) -> Response:
    record, _ = await _job(gw, user, job_id)
    after = parse_stream_id(request.headers.get("last-event-id"))
    return event_stream(job_events(gw.aredis, gw.settings.namespace, job_id, after=after, reader=gw.jobs,
                                   view=lambda meta: gw.job_view(job_id, record, meta)))
