"""The console app, mounted by the gateway at ``/console``: its routers, static files and error pages.

A FastAPI app of its own (mounted, so its pages are no API operations: no OpenAPI entry, no API key check in
:class:`~..middleware.GatewayMiddleware`, which still applies its body limit and its Redis check). Its errors
are HTML pages, not problem details: a missing login redirects (:class:`.auth.LoginRequired`), a missing right
is a 403 page, a library error the page its status says.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, RedirectResponse, Response

from ...errors import DspexError
from ..problems import status_for
from ..state import Gateway
from .auth import COOKIE, CookieSigner, Forbidden, LoginRequired, console_secret
from .render import SECURITY_HEADERS, page
from .routes import fleet, jobs, overview, programs, runs, session, usage

__all__ = ["create_console"]

log = logging.getLogger(__name__)

_STATIC = Path(str(resources.files("dspex_tasks.gateway.console"))) / "static"
_STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}\.(js|css|txt)$")
_TYPES = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8", "txt": "text/plain; charset=utf-8"}


def create_console(gw: Gateway) -> FastAPI:
    """The console app for one gateway (mount it at ``/console``)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, title="dspex console")
    app.state.gateway = gw
    secret, configured = console_secret(gw.settings)
    if not configured and gw.settings.gateway_auth:
        log.warning("DSPEX_CONSOLE_SECRET is not set: console logins are signed with a random key of this process; "
                    "they end when the gateway restarts and do not carry between uvicorn worker processes")
    app.state.signer = CookieSigner(secret)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        path = _STATIC / name
        if not _STATIC_NAME.match(name) or not path.is_file():
            raise HTTPException(404, f"no static file '{name}'")
        return FileResponse(path, media_type=_TYPES[name.rsplit(".", 1)[1]],
                            headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})

    for module in (session, overview, programs, runs, jobs, usage, fleet):
        app.include_router(module.router)
    _install_handlers(app)
    return app


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        base = request.scope.get("root_path", "")
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        location = f"{base}/login" + (f"?next={quote(target, safe='')}" if request.method == "GET" else "")
        if request.headers.get("hx-request"):  # an htmx swap: make the browser go to the login page itself
            response: Response = Response(status_code=204, headers={"HX-Redirect": location})
        else:
            response = RedirectResponse(location, status_code=303, headers=SECURITY_HEADERS)
        if exc.clear:
            response.delete_cookie(COOKIE, path=base or "/", httponly=True, samesite="lax")
        return response

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> Response:
        return page(request, "error.html", status_code=403, title="Not allowed", message=exc.message)

    @app.exception_handler(DspexError)
    async def library_error(request: Request, exc: DspexError) -> Response:
        status = status_for(exc)
        return page(request, "error.html", status_code=status, title=f"{type(exc).__name__}", message=str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return page(request, "error.html", status_code=404, title="Not found", message=f"no such page ({where})")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return page(request, "error.html", status_code=exc.status_code, title="Not found"
                    if exc.status_code == 404 else "Error", message=str(exc.detail))

    async def unavailable(request: Request, exc: Exception) -> Response:
        log.warning("console cannot reach Redis: %s", exc)
        return page(request, "error.html", status_code=503, title="Store unavailable",
                    message="Redis does not answer; retry shortly", headers={"Retry-After": "1"})

    app.add_exception_handler(RedisConnectionError, unavailable)
    app.add_exception_handler(RedisTimeoutError, unavailable)
