"""Scope checks as FastAPI dependencies: every route declares the right it needs by taking one of them.

* :data:`ReadKey`, :data:`WriteKey`, :data:`AdminKey`: the caller's :class:`~..scopes.Access`, once it has the
  right (else 403 naming the right);
* :data:`ReadSession`, :data:`WriteSession`, :data:`AdminSession`: a ``{session}`` path parameter in the key's
  sessions (else 403 naming the session: the caller named it, so nothing leaks);
* :data:`ReadableJob`, :data:`WritableJob`, :data:`ReadableRun`, :data:`WritableRun`: a ``{job_id}`` or
  ``{run_id}`` the key may see, else 404 exactly as for an unknown id (a key cannot probe other keys' ids).

:func:`check_routes` (run by ``create_gateway`` and again when the app starts) refuses an app with a
non-public route that takes none of them, so a new route cannot forget its scope.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.routing import APIRoute

from ...errors import ConfigurationError, JobNotFound, RunNotFound
from ...optimize.runs import RunRecord
from ..middleware import PUBLIC_PATHS
from ..models import IdPath, JobIdPath, RunIdPath
from ..problems import Problem
from ..scopes import Access, Right, session_label
from .common import GatewayDep

__all__ = ["REQUIRE", "RUN_KEY_FIELD", "AdminKey", "AdminSession", "ReadKey", "ReadSession", "ReadableJob",
           "ReadableRun", "SeenJob", "WritableJob", "WritableRun", "WriteKey", "WriteSession", "check_routes",
           "check_session", "job_visible", "route_rights", "run_visible"]

FORBIDDEN = "forbidden"


def access_of(request: Request) -> Access:
    """The request's access (set by the middleware); a request it did not admit has none."""
    access = getattr(request.state, "access", None)
    if not isinstance(access, Access):
        raise Problem(403, FORBIDDEN, "no API key was checked for this request")
    return access


def _require(right: Right) -> Callable[[Request], Awaitable[Access]]:
    async def require(request: Request) -> Access:
        access = access_of(request)
        if not access.scopes.has(right):
            raise Problem(403, FORBIDDEN, access.refuse_right(right), right=right.value)
        return access

    require.__name__ = f"require_{right.value}"
    return require


#: The dependency that declares each right (the route walk looks for these callables).
REQUIRE: dict[Right, Callable[[Request], Awaitable[Access]]] = {r: _require(r) for r in Right}
_RIGHT_OF = {dep: right for right, dep in REQUIRE.items()}

ReadKey = Annotated[Access, Depends(REQUIRE[Right.READ])]
WriteKey = Annotated[Access, Depends(REQUIRE[Right.WRITE])]
AdminKey = Annotated[Access, Depends(REQUIRE[Right.ADMIN])]
# Defaults for the dependencies made per right below: a string annotation (``from __future__ import annotations``)
# is resolved in the module's globals, where the factory's ``right`` is not.
_DEPENDS: dict[Right, Any] = {r: Depends(REQUIRE[r]) for r in Right}


def check_session(access: Access, session: str | None, *, what: str = "session") -> None:
    """403 naming ``session`` (None: the default program) unless the key may use it."""
    if not access.scopes.allows(session):
        extra: dict[str, Any] = {what: session_label(session)}
        raise Problem(403, FORBIDDEN, access.refuse_session(session, what=what), **extra)


def _session(right: Right) -> Callable[..., Awaitable[str]]:
    async def session_in_scope(session: IdPath, access: Access = _DEPENDS[right]) -> str:
        check_session(access, session)
        return session

    return session_in_scope


ReadSession = Annotated[str, Depends(_session(Right.READ))]
WriteSession = Annotated[str, Depends(_session(Right.WRITE))]
AdminSession = Annotated[str, Depends(_session(Right.ADMIN))]


# -- jobs and runs: 404 unless visible ------------------------------------------------------------------
def job_visible(access: Access, record: dict[str, Any] | None) -> bool:
    """A job is its submitting key's (in a session still in its scope); admin sees every job, including those
    submitted outside the gateway (no record)."""
    if access.scopes.admin:
        return True
    if record is None:
        return False
    return record.get("key") == access.key_id and access.scopes.allows(record.get("session"))


@dataclass(frozen=True)
class SeenJob:
    """A job the key may see: its gateway record (None for admin's view of an outside job) and result meta."""

    id: str
    record: dict[str, Any] | None
    meta: dict[str, Any] | None


def _job(right: Right) -> Callable[..., Awaitable[SeenJob]]:
    async def visible_job(job_id: JobIdPath, gw: GatewayDep, access: Access = _DEPENDS[right]) -> SeenJob:
        record, meta = await gw.jobs.lookup(job_id)
        if (record is None and meta is None) or not job_visible(access, record):
            raise Problem(404, JobNotFound.code, f"no job '{job_id}' (unknown, its result expired, or not this "
                          "key's)")
        return SeenJob(job_id, record, meta)

    return visible_job


ReadableJob = Annotated[SeenJob, Depends(_job(Right.READ))]
#: A job the key may see, with the ``write`` right (checked first: a key without it gets 403, not 404); its
#: session is in the key's scope already (:func:`job_visible`).
WritableJob = Annotated[SeenJob, Depends(_job(Right.WRITE))]

#: The run record field naming the key that started a run through the gateway.
RUN_KEY_FIELD = "gateway_key"


def run_visible(access: Access, session: str | None, key_id: str | None) -> bool:
    """A run with a session is every in-scope key's; a dry run (no session) is its starting key's; admin sees all."""
    if access.scopes.admin:
        return True
    if session:
        return access.scopes.allows(session)
    return key_id == access.key_id and access.scopes.allows(None)


def _run(right: Right) -> Callable[..., RunRecord]:
    def visible_run(run_id: RunIdPath, gw: GatewayDep, access: Access = _DEPENDS[right]
                    ) -> RunRecord:  # sync: FastAPI runs it in the thread pool (the run store is synchronous)
        rec: RunRecord = gw.client.runs.get(run_id)  # RunNotFound: 404
        if not run_visible(access, rec.session or None, rec.extra.get(RUN_KEY_FIELD)):
            raise RunNotFound(f"no optimization run '{run_id}'")  # the unknown id's very answer
        return rec

    return visible_run


ReadableRun = Annotated[RunRecord, Depends(_run(Right.READ))]
WritableRun = Annotated[RunRecord, Depends(_run(Right.WRITE))]


# -- every route declares a right -------------------------------------------------------------------------
def _rights_in(dependant: Any) -> set[Right]:
    found = {_RIGHT_OF[dependant.call]} if dependant.call in _RIGHT_OF else set()
    for sub in dependant.dependencies:
        found |= _rights_in(sub)
    return found


def _routes(app: FastAPI) -> Iterable[tuple[Any, str]]:
    """(route, path template) of every route, included routers' too."""
    try:  # FastAPI >= 0.137.2: included routers are nodes of a tree
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: a flat list
        for route in app.router.routes:
            yield route, str(getattr(route, "path_format", getattr(route, "path", "")))
        return
    for ctx in iter_route_contexts(app.router.routes):
        yield ctx.route, str(ctx.path_format or ctx.path or "")


_ORDER = list(Right)


def route_rights(app: FastAPI) -> dict[tuple[str, str], str]:
    """``(METHOD, path template) -> right`` of every non-public route (the strongest it declares). Raises
    ConfigurationError naming each non-public route that declares none."""
    out: dict[tuple[str, str], str] = {}
    missing: list[str] = []
    for route, path in _routes(app):
        if path in PUBLIC_PATHS:
            continue
        methods = sorted(getattr(route, "methods", None) or ["*"])
        rights = _rights_in(route.dependant) if isinstance(route, APIRoute) else set()
        if not rights:
            missing += [f"{m} {path}" for m in methods]
            continue
        strongest = max(rights, key=_ORDER.index)
        out.update({(m, path): strongest.value for m in methods})
    if missing:
        raise ConfigurationError(f"gateway routes without a scope: {', '.join(missing)}; take ReadKey, WriteKey, "
                                 "AdminKey (or a session/job/run dependency) from gateway.routers.access, or add "
                                 "the path to PUBLIC_PATHS")
    return out


def check_routes(app: FastAPI) -> dict[tuple[str, str], str]:
    """:func:`route_rights`, named for what the app factory and the lifespan use it for."""
    return route_rights(app)
