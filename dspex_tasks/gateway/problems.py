"""RFC 9457 problem details: every error the gateway returns, with the library's stable ``code``.

A problem is ``application/problem+json``: ``type``, ``title``, ``status``, ``detail``, ``instance``, plus
``code`` (the ``errors.*`` code, or an HTTP one such as ``unauthorized``) and, for validation failures,
``errors``: ``[{"field": "entities.2.type", "message": ..., "pointer": "/inputs/entities/2/type"}]``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from .. import errors

__all__ = ["PROBLEM_JSON", "PROBLEM_SCHEMA", "Problem", "install_handlers", "problem_body", "problem_response",
           "status_for", "problem_for_error"]

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:dspex:problem:"

# Library errors -> HTTP status (most specific class first).
_STATUS: list[tuple[type[errors.DspexError], int]] = [
    (errors.ValidationError, 422),
    (errors.InvalidId, 422),
    (errors.SignatureError, 422),
    (errors.UnknownSignature, 404),
    (errors.NotFound, 404),
    (errors.Cancelled, 409),
    (errors.BudgetExceeded, 409),
    (errors.LMParseError, 502),
    (errors.LMError, 502),
    (errors.TaskTimeout, 504),
    (errors.ResultLost, 410),
    (errors.ConfigurationError, 500),
    (errors.StoreFull, 507),  # Redis is full (maxmemory): Insufficient Storage, nothing written
]

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": "RFC 9457 problem details.",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "code": {"type": "string", "description": "stable error code (errors.*.code or an HTTP one)"},
        "errors": {"type": "array", "items": {
            "type": "object",
            "properties": {"field": {"type": "string"}, "message": {"type": "string"},
                           "pointer": {"type": "string"}},
            "required": ["field", "message"]}},
        "job_id": {"type": "string"},
        "retry_after": {"type": "integer"},
        "right": {"type": "string", "enum": ["read", "write", "admin"],
                  "description": "403: the right the API key lacks"},
        "session": {"type": "string", "description": "403: the session (or '@default', the default program) "
                                                     "outside the API key's scope"},
        "dataset": {"type": "string", "description": "403: the dataset outside the API key's scope"},
    },
    "required": ["type", "title", "status", "code"],
}


class Problem(Exception):
    """Raise inside a handler to answer with a problem."""

    def __init__(self, status: int, code: str, detail: str = "", *, errors: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail or code)
        self.status, self.code, self.detail = status, code, detail
        self.errors, self.headers, self.extra = errors, headers, extra


# Library codes whose class may be newer than this table (matched by code, most specific first).
_STATUS_BY_CODE = {"lm_timeout": 504, "backend_unavailable": 503, "dead_letter": 502}


def status_for(exc: errors.DspexError) -> int:
    if exc.code in _STATUS_BY_CODE:
        return _STATUS_BY_CODE[exc.code]
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def problem_body(status: int, code: str, detail: str = "", *, instance: str | None = None,
                 errors: list[dict[str, str]] | None = None, **extra: Any) -> dict[str, Any]:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {"type": TYPE_PREFIX + code, "title": title, "status": status, "code": code}
    if detail:
        body["detail"] = detail
    if instance:
        body["instance"] = instance
    if errors is not None:
        body["errors"] = errors
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def problem_response(status: int, code: str, detail: str = "", *, instance: str | None = None,
                     errors: list[dict[str, str]] | None = None, headers: dict[str, str] | None = None,
                     **extra: Any) -> JSONResponse:
    body = problem_body(status, code, detail, instance=instance, errors=errors, **extra)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
               415: "unsupported_media_type", 429: "rate_limited"}
_WHAT = re.compile(r"invalid (\w+) id")


def _field_errors(exc: errors.DspexError, prefix: str | None) -> list[dict[str, str]] | None:
    if isinstance(exc, errors.ValidationError):
        out = []
        for e in exc.errors:
            item = {"field": e.get("field", ""), "message": e.get("message", "")}
            if prefix is not None:
                parts = [p for p in item["field"].split(".") if p]
                if prefix and parts[:1] != [prefix]:
                    parts = [prefix, *parts]
                item["pointer"] = "/" + "/".join(parts)
            out.append(item)
        return out
    if isinstance(exc, errors.InvalidId):
        m = _WHAT.search(exc.message)
        field = m.group(1) if m else "session"
        return [{"field": field, "message": exc.message, "pointer": f"/{field}"}]
    return None


def problem_for_error(exc: errors.DspexError, *, instance: str | None = None, pointer_prefix: str | None = None,
                      status: int | None = None, **extra: Any) -> JSONResponse:
    """A library error as a problem (``pointer_prefix`` places validation fields in the request body)."""
    return problem_response(status or status_for(exc), exc.code, exc.message, instance=instance,
                            errors=_field_errors(exc, pointer_prefix), **extra)


def _loc_field(loc: tuple[Any, ...]) -> tuple[str, str]:
    where, rest = (str(loc[0]), [str(p) for p in loc[1:]]) if loc else ("body", [])
    field = ".".join(rest) or where
    pointer = "/" + "/".join(rest) if where == "body" else f"{where}:{field}"
    return field, pointer


def _allowed(request: Request) -> list[str]:
    from starlette.routing import Match

    routes: Iterable[Any] = request.app.router.routes
    try:  # FastAPI >= 0.137.2: included routers are nodes of a tree; this walks every route (with its prefix)
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI copies included routes into a flat list
        pass
    else:
        routes = iter_route_contexts(request.app.router.routes)
    methods: set[str] = set()
    for route in routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install_handlers(app: FastAPI) -> None:
    """Every error path of the app answers with a problem."""

    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return problem_response(exc.status, exc.code, exc.detail, instance=request.url.path, errors=exc.errors,
                                headers=exc.headers, **exc.extra)

    async def on_dspex(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, errors.DspexError)
        if status_for(exc) >= 500:
            log.error("request %s failed: %s", request.url.path, exc)
        return problem_for_error(exc, instance=request.url.path, pointer_prefix="")

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        items = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in items):
            return problem_response(400, "malformed_json", "the request body is not valid JSON",
                                    instance=request.url.path)
        out = []
        for e in items:
            field, pointer = _loc_field(tuple(e.get("loc", ())))
            out.append({"field": field, "message": str(e.get("msg", "invalid")), "pointer": pointer})
        shown = "; ".join(f"{e['field']}: {e['message']}" for e in out[:5])
        return problem_response(422, errors.ValidationError.code, f"invalid request: {shown}",
                                instance=request.url.path, errors=out)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method of the path, not only the first route's
            headers["Allow"] = ", ".join(_allowed(request))
        return problem_response(exc.status_code, code, detail, instance=request.url.path, headers=headers or None)

    async def on_redis(request: Request, exc: Exception) -> Response:
        log.warning("redis unavailable for %s: %s", request.url.path, exc)
        return problem_response(503, "unavailable", "the store is unavailable; retry shortly",
                                instance=request.url.path, headers={"Retry-After": "1"})

    async def on_disconnect(request: Request, exc: Exception) -> Response:
        log.debug("client left %s before sending its body", request.url.path)
        return Response(status_code=400)  # nobody reads it

    async def on_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return problem_response(500, "internal_error", "an unexpected error occurred", instance=request.url.path)

    import redis.exceptions as redis_errors

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(errors.DspexError, on_dspex)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(redis_errors.ConnectionError, on_redis)
    app.add_exception_handler(redis_errors.TimeoutError, on_redis)
    app.add_exception_handler(ClientDisconnect, on_disconnect)
    app.add_exception_handler(Exception, on_error)
