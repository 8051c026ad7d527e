"""``/console/programs``: the published signatures and programs, each session's stored programs, a program's
versions with a side-by-side diff of two of them, and rollback (a confirmation page, then a post: ``write``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from ....errors import ValidationError
from ....programs.store import ProgramRecord
from ...routers.common import GatewayDep
from ...scopes import Right
from ..auth import ConsoleUser, need, need_session
from ..data import program_rows, visible_sessions
from ..diff import diff_states
from ..forms import check_same_origin, read_form
from ..render import SECURITY_HEADERS, page

__all__ = ["router"]

router = APIRouter()

#: The most versions a program page lists (newest first).
MAX_VERSIONS = 100


@router.get("/programs", include_in_schema=False)
def programs_page(request: Request, gw: GatewayDep, user: ConsoleUser) -> Response:
    need(user, Right.READ)
    sessions, cut = visible_sessions(gw, user.access)
    signatures = dict(sorted(gw.client.signatures(refresh=True).items()))
    return page(request, "programs.html", active="programs", signatures=signatures,
                sessions=program_rows(gw, sessions), sessions_cut=cut)


def _version(value: str | None, versions: list[int], default: int | None) -> int | None:
    if value is None or value == "":
        return default
    if not value.isdigit() or int(value) not in versions:
        raise ValidationError.from_errors("version", [{"field": "version", "message": f"no version {value[:20]}"}])
    return int(value)


def _records(gw: Any, session: str, program: str) -> tuple[list[int], dict[int, ProgramRecord], int]:
    """(versions, newest first; their records; the current version)."""
    store = gw.client.programs
    versions = sorted(store.history(session, program), reverse=True)[:MAX_VERSIONS]
    if not versions:
        store.get(session, program)  # raises ProgramNotFound, naming it
    current = store.current_version(session, program)
    records = {v: store.get(session, program, v) for v in dict.fromkeys([*versions, current])}
    return versions, records, current


@router.get("/programs/{session}/{program}", include_in_schema=False)
def program_page(request: Request, session: str, program: str, gw: GatewayDep, user: ConsoleUser) -> Response:
    need_session(user, session)
    versions, records, current = _records(gw, session, program)
    other = [v for v in versions if v != current]
    a = _version(request.query_params.get("a"), versions, other[0] if other else current)
    b = _version(request.query_params.get("b"), versions, current)
    diff = diff_states(records[a].state, records[b].state) if a is not None and b is not None else []
    return page(request, "program.html", active="programs", session=session, program=program, versions=versions,
                records=records, current=current, a=a, b=b, diff=diff,
                can_write=user.can("write") and user.access.scopes.allows(session))


@router.get("/programs/{session}/{program}/rollback", include_in_schema=False)
def confirm_rollback(request: Request, session: str, program: str, gw: GatewayDep, user: ConsoleUser) -> Response:
    need_session(user, session, Right.WRITE)
    versions, records, current = _records(gw, session, program)
    target = _version(request.query_params.get("version"), versions, None)
    if target is None:
        raise ValidationError.from_errors("version", [{"field": "version", "message": "name a version"}])
    return page(request, "rollback.html", active="programs", session=session, program=program, current=current,
                target=target, records=records, diff=diff_states(records[current].state, records[target].state))


@router.post("/programs/{session}/{program}/rollback", include_in_schema=False)
async def rollback(request: Request, session: str, program: str, gw: GatewayDep, user: ConsoleUser) -> Response:
    from starlette.concurrency import run_in_threadpool

    check_same_origin(request)
    need_session(user, session, Right.WRITE)
    form = await read_form(request)
    value = form.get("version", "")
    if not value.isdigit():
        raise ValidationError.from_errors("version", [{"field": "version", "message": "expected a version number"}])
    version = await run_in_threadpool(gw.client.programs.rollback, session, program, int(value))
    base = request.scope.get("root_path", "")
    return RedirectResponse(f"{base}/programs/{session}/{program}?done=rolled+back+to+version+{version}",
                            status_code=303, headers=SECURITY_HEADERS)
