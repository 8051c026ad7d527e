"""The gateway's outer ASGI layer: request size limit, API key check and per-key rate limit.

The key's scopes travel on to the routes as ``request.state.access`` (a :class:`~.scopes.Access`), where each
route's declared right and the sessions it touches are checked (:mod:`.routers.access`).

Pure ASGI (no ``BaseHTTPMiddleware``), so streaming responses (SSE) pass through untouched. Order: a
declared ``Content-Length`` over the limit is refused before anything else (413); then the key
(401, or 429 with ``Retry-After``); then the body is counted while the app reads it, so a chunked body
that grows past the limit fails with 413 too.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import StoreFull
from .auth import key_from_headers
from .problems import PROBLEM_JSON, problem_body
from .scopes import Access

if TYPE_CHECKING:
    from .state import Gateway

__all__ = ["CONSOLE_PATH", "GatewayMiddleware", "PUBLIC_PATHS", "BodyTooLarge", "is_console", "is_loopback"]

log = logging.getLogger(__name__)

#: The web console (:mod:`.console`), mounted here: it checks its own signed login cookie, not an API key header.
CONSOLE_PATH = "/console"
# the console's mount (route template /console/{path}) is no API route: it declares no right
PUBLIC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/healthz",
                          CONSOLE_PATH + "/{path}"})


def is_console(path: str) -> bool:
    return path == CONSOLE_PATH or path.startswith(CONSOLE_PATH + "/")


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the {limit}-byte limit")


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def _send_problem(send: Send, status: int, code: str, detail: str, path: str,
                        headers: dict[str, str] | None = None, **extra: Any) -> None:
    body = json.dumps(problem_body(status, code, detail, instance=path, **extra)).encode()
    raw = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gw = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        try:
            await self.gw.ensure_started()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("gateway cannot reach Redis: %s", exc)
            await _send_problem(send, 503, "unavailable", "the store is unavailable; retry shortly", path,
                                {"Retry-After": "1"})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        limit = self.gw.settings.gateway_max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _send_problem(send, 413, "payload_too_large", f"the request body exceeds the {limit}-byte limit",
                                path, {"Connection": "close"})
            return
        try:
            if path not in PUBLIC_PATHS and not is_console(path) and not await self._admit(scope, headers, send, path):
                return
        except StoreFull as exc:  # the key check takes a rate-limit token: a write a full Redis refuses
            log.warning("gateway: %s", exc)
            await _send_problem(send, 507, "store_full", str(exc), path)
            return
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("gateway cannot reach Redis: %s", exc)
            await _send_problem(send, 503, "unavailable", "the store is unavailable; retry shortly", path,
                                {"Retry-After": "1"})
            return
        await self.app(scope, _counting(receive, limit), send)

    async def _admit(self, scope: Scope, headers: dict[str, str], send: Send, path: str) -> bool:
        settings = self.gw.settings
        raw_key: str | None = None
        if settings.gateway_auth:
            raw_key = key_from_headers(headers)
            if raw_key is None:
                await _send_problem(send, 401, "unauthorized", "an API key is required (Authorization: Bearer <key> "
                                    "or X-API-Key)", path, {"WWW-Authenticate": 'Bearer realm="dspex"'})
                return False
        else:
            client = scope.get("client")
            if not is_loopback(client[0] if client else None):
                await _send_problem(send, 403, "forbidden", "authentication is off: only loopback clients are "
                                    "served", path)
                return False
        result = await self.gw.limiter.check(self.gw.aredis, raw_key)
        if not result.ok:
            await _send_problem(send, 401, "unauthorized", "unknown or revoked API key", path,
                                {"WWW-Authenticate": 'Bearer realm="dspex", error="invalid_token"'})
            return False
        if result.limited:
            await _send_problem(send, 429, "rate_limited",
                                f"more than {result.limit} requests per minute for this key", path,
                                {"Retry-After": str(result.retry_after_s)}, retry_after=result.retry_after_s)
            return False
        state = scope.setdefault("state", {})
        state["api_key_id"] = result.key_id
        state["access"] = Access(result.key_id or "anonymous", result.scopes)
        return True


def _counting(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return wrapped
