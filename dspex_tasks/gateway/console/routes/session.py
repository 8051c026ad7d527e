"""Log in (an API key for a signed cookie) and log out."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from ...routers.common import GatewayDep
from ..auth import COOKIE, CookieSigner, Login, key_record
from ..forms import check_same_origin, read_form
from ..render import SECURITY_HEADERS, page

__all__ = ["router"]

router = APIRouter()


def _next(request: Request, value: str | None) -> str:
    """Where to go after the login: a console path only (never another site: ``//host``, ``/\\host``)."""
    base = str(request.scope.get("root_path", ""))
    if value and value.startswith(base + "/") and not value.startswith(("//", "/\\")) and "\\" not in value:
        return value
    return base + "/"


@router.get("/login", include_in_schema=False)
async def login_form(request: Request, gw: GatewayDep) -> Response:
    if not gw.settings.gateway_auth:
        return RedirectResponse(_next(request, None), status_code=303)
    return page(request, "login.html", next=_next(request, request.query_params.get("next")), error=None)


@router.post("/login", include_in_schema=False)
async def login(request: Request, gw: GatewayDep) -> Response:
    check_same_origin(request)
    form = await read_form(request)
    target = _next(request, form.get("next"))
    raw = form.get("key", "").strip()
    await gw.ensure_started()
    result = await gw.limiter.check(gw.aredis, raw) if raw else None
    record = await key_record(gw, result.key_id) if result is not None and result.ok else None
    if result is None or not result.ok or record is None:
        return page(request, "login.html", status_code=401, next=target, error="Unknown or revoked API key.")
    if result.limited:
        return page(request, "login.html", status_code=429, next=target, headers={
            "Retry-After": str(result.retry_after_s)}, error=f"Too many requests for this key: retry in "
                                                             f"{result.retry_after_s} s.")
    rights = tuple(sorted(r.value for r in result.scopes.rights))
    max_age = gw.settings.console_session_s
    signer: CookieSigner = request.app.state.signer
    cookie = signer.sign(Login(result.key_id, float(record["created_at"]), rights, int(time.time()) + max_age))
    response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
    response.set_cookie(COOKIE, cookie, max_age=max_age, path=request.scope.get("root_path", "") or "/",
                        httponly=True, samesite="lax", secure=request.url.scheme == "https")
    return response


@router.get("/logout", include_in_schema=False)
async def logout(request: Request) -> Response:
    base = request.scope.get("root_path", "")
    response = RedirectResponse(f"{base}/login", status_code=303, headers=SECURITY_HEADERS)
    response.delete_cookie(COOKIE, path=base or "/", httponly=True, samesite="lax")
    return response
