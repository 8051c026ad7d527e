"""Sessions and their stored programs: list, get, put, delete, history, rollback.

Store calls are synchronous: these routes are plain functions, run in the thread pool. Reading needs ``read``
on the session, putting and rolling back ``write``; deleting a program (its history) or a session is ``admin``'s.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response

from ...dsl.signature import MODULE_PREDICTORS
from ...errors import ProgramNotFound, ValidationError
from ...programs.store import predictor_states
from ..checks import check_program_state
from ..models import IdPath, Names, ProgramHistory, ProgramOut, ProgramPut, ProgramVersion, Rollback
from ..problems import Problem
from .access import AdminSession, ReadKey, ReadSession, WriteSession
from .common import GatewayDep

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/sessions", response_model=Names, tags=["programs"],
            summary="Sessions, most recent first (those in the key's scope)")
def list_sessions(gw: GatewayDep, access: ReadKey) -> Names:
    return Names(items=[s for s in gw.client.programs.sessions() if access.scopes.allows(s)])


@router.delete("/v1/sessions/{session}", status_code=204, response_class=Response, tags=["programs"],
               summary="Delete a session and all its programs")
def delete_session(session: AdminSession, gw: GatewayDep) -> Response:
    gw.client.programs.delete_session(session)
    return Response(status_code=204)


@router.get("/v1/sessions/{session}/programs", response_model=Names, tags=["programs"],
            summary="Program names stored in a session")
def list_programs(session: ReadSession, gw: GatewayDep) -> Names:
    return Names(items=gw.client.programs.list(session))


@router.get("/v1/sessions/{session}/programs/{program}", response_model=ProgramOut, tags=["programs"],
            summary="The current (or a given) version of a program")
def get_program(session: ReadSession, program: IdPath, gw: GatewayDep,
                version: Annotated[int | None, Query(ge=1)] = None) -> ProgramOut:
    rec = gw.client.programs.get(session, program, version)
    return ProgramOut(session=session, program=program, version=rec.version, signature=rec.signature,
                      updated_at=rec.updated_at, state=rec.state)


@router.put("/v1/sessions/{session}/programs/{program}", response_model=ProgramVersion, tags=["programs"],
            summary="Store a new version of a program and make it current")
def put_program(session: WriteSession, program: IdPath, body: ProgramPut, gw: GatewayDep) -> ProgramVersion:
    if body.signature is not None and body.signature not in gw.signatures:
        known = ", ".join(sorted(gw.signatures)) or "none"
        raise Problem(422, ValidationError.code, f"unknown signature '{body.signature}'", errors=[
            {"field": "signature", "message": f"not a published signature (published: {known})",
             "pointer": "/signature"}])
    check_program_state(body.state)
    name = body.signature or program  # what a worker loads the program into
    _check_fits(body.state, name, gw.signatures.get(name))
    version = gw.client.programs.put(session, program, body.state, signature=body.signature)
    return ProgramVersion(session=session, program=program, version=version)


def _check_fits(state: dict[str, Any], name: str, published: dict[str, Any] | None) -> None:
    """A 422 naming each key of ``state`` that does not fit the predictors workers published for ``name``.

    A program no published signature or program is named after must still fit a signature's module (the
    default ``predict``: one predictor).
    """
    predictors = (published or {}).get("predictors") or MODULE_PREDICTORS["predict"]
    try:
        predictor_states(state, list(predictors), module=f"'{name}'")
    except ValidationError as exc:
        errs = [{"field": f"state.{e['field']}", "message": e["message"],
                 "pointer": "/state/" + e["field"].replace("~", "~0").replace("/", "~1")} for e in exc.errors]
        raise Problem(422, ValidationError.code, exc.message, errors=errs) from None


@router.delete("/v1/sessions/{session}/programs/{program}", status_code=204, response_class=Response,
               tags=["programs"], summary="Delete a program and its history")
def delete_program(session: AdminSession, program: IdPath, gw: GatewayDep) -> Response:
    gw.client.programs.delete(session, program)
    return Response(status_code=204)


@router.get("/v1/sessions/{session}/programs/{program}/history", response_model=ProgramHistory, tags=["programs"],
            summary="Stored versions of a program")
def program_history(session: ReadSession, program: IdPath, gw: GatewayDep) -> ProgramHistory:
    versions = gw.client.programs.history(session, program)
    if not versions:
        raise ProgramNotFound(f"no program '{program}' in session '{session}'")
    return ProgramHistory(session=session, program=program, versions=versions)


@router.post("/v1/sessions/{session}/programs/{program}/rollback", response_model=ProgramVersion,
             tags=["programs"], summary="Make an earlier version current again")
def rollback_program(session: WriteSession, program: IdPath, body: Rollback, gw: GatewayDep) -> ProgramVersion:
    version = gw.client.programs.rollback(session, program, body.version)
    return ProgramVersion(session=session, program=program, version=version)
