"""The console's login: an API key presented once, then a signed, HTTP-only cookie (no session store).

``POST /console/login`` checks the key exactly as the API does (:meth:`~..auth.RequestLimiter.check`: the stored
hash, the key's rate bucket) and answers with a cookie ``dspex_console`` holding ``v1.<payload>.<mac>``: the payload
is base64url JSON ``{"k": key id, "c": the key's created_at, "r": its rights, "exp": unix seconds}`` and the mac
is HMAC-SHA256 of ``v1.<payload>`` under the console secret (``DSPEX_CONSOLE_SECRET``, else a random secret per
gateway process). The raw key is never stored in the cookie.

Every console request verifies the mac (constant-time) and the expiry, then re-reads the key's record: a revoked
key's cookie stops working at once, and the rights used are the key's current ones, never more than the cookie
was issued with. A missing, forged, tampered, expired or revoked cookie is a redirect (303) to the login page.

With ``DSPEX_GATEWAY_AUTH=off`` the console needs no login, and serves loopback clients only, as the API does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from ... import keys
from ...settings import Settings
from ..middleware import is_loopback
from ..routers.common import GatewayDep
from ..scopes import Access, Right, Scopes
from ..state import Gateway

__all__ = ["COOKIE", "ConsoleUser", "CookieSigner", "Forbidden", "Login", "LoginRequired", "User", "console_secret",
           "console_user", "key_record", "need", "need_session"]

log = logging.getLogger(__name__)

COOKIE = "dspex_console"
_VERSION = "v1"
_KEY_ID = re.compile(r"^[0-9a-f]{8}$")


class LoginRequired(Exception):
    """Raised when a console request has no valid login cookie: answered with a redirect to the login page."""

    def __init__(self, reason: str, *, clear: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.clear = clear


class Forbidden(Exception):
    """Raised when the logged-in key lacks a right or a session a console page or action needs (403 page)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def console_secret(settings: Settings) -> tuple[bytes, bool]:
    """(the cookie signing key, whether it came from ``DSPEX_CONSOLE_SECRET``)."""
    if settings.console_secret is not None:
        return hashlib.sha256(settings.console_secret.get_secret_value().encode()).digest(), True
    return secrets.token_bytes(32), False


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Login:
    """What a console cookie says: the key, its record's creation time, the rights it was issued with, expiry."""

    key_id: str
    created_at: float
    rights: tuple[str, ...]
    expires_at: int


class CookieSigner:
    """Signs and verifies console cookies (HMAC-SHA256)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self._secret, body.encode(), hashlib.sha256).digest())

    def sign(self, login: Login) -> str:
        payload = json.dumps({"k": login.key_id, "c": login.created_at, "r": list(login.rights),
                              "exp": login.expires_at}, separators=(",", ":"))
        body = f"{_VERSION}.{_b64(payload.encode())}"
        return f"{body}.{self._mac(body)}"

    def verify(self, value: str | None, *, now: float | None = None) -> Login:
        """The cookie's login. Raises LoginRequired: no cookie, a bad mac (forged or tampered), or expired."""
        if not value:
            raise LoginRequired("not logged in")
        version, _, rest = value.partition(".")
        payload, _, mac = rest.partition(".")
        if version != _VERSION or not payload or not mac:
            raise LoginRequired("a malformed login cookie", clear=True)
        if not hmac.compare_digest(mac, self._mac(f"{version}.{payload}")):
            raise LoginRequired("a login cookie with a bad signature", clear=True)
        try:
            data = json.loads(_unb64(payload))
            login = Login(str(data["k"]), float(data["c"]), tuple(str(r) for r in data["r"]), int(data["exp"]))
        except (binascii.Error, ValueError, KeyError, TypeError):
            raise LoginRequired("an unreadable login cookie", clear=True) from None
        if login.expires_at <= (time.time() if now is None else now):
            raise LoginRequired("the login expired", clear=True)
        return login


@dataclass(frozen=True)
class User:
    """Who uses the console: the key id (``anonymous`` with auth off), its access, and when the login ends."""

    access: Access
    expires_at: int | None

    @property
    def key_id(self) -> str:
        return self.access.key_id

    @property
    def rights(self) -> str:
        return self.access.scopes.describe()[0]

    @property
    def sessions(self) -> str:
        return self.access.scopes.describe()[1]

    def can(self, right: str) -> bool:
        return self.access.scopes.has(Right(right))


async def key_record(gw: Gateway, key_id: str) -> dict[str, Any] | None:
    """The stored record of the key with this id (None: revoked). One HVALS: key hashes are few."""
    for raw in await gw.aredis.hvals(keys.gateway_api_keys(gw.settings.namespace)):
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("id") == key_id:
            return data
    return None


def narrowed(current: Scopes, issued: tuple[str, ...]) -> Scopes:
    """The key's current scopes, with no right beyond those the cookie was issued with."""
    allowed = {Right(r) for r in issued if r in {x.value for x in Right}}
    if Right.ADMIN in allowed:
        return current
    return Scopes(frozenset(r for r in current.rights if r in allowed), current.sessions, current.legacy)


async def console_user(request: Request, gw: GatewayDep) -> User:
    """The logged-in user of a console request (a FastAPI dependency). Raises LoginRequired."""
    await gw.ensure_started()
    if not gw.settings.gateway_auth:
        client = request.client
        if not is_loopback(client.host if client else None):
            raise Forbidden("authentication is off: the console serves loopback clients only")
        user = User(Access("anonymous", Scopes.full()), None)
    else:
        signer: CookieSigner = request.app.state.signer
        login = signer.verify(request.cookies.get(COOKIE))
        if not _KEY_ID.match(login.key_id):
            raise LoginRequired("an unreadable login cookie", clear=True)
        record = await key_record(gw, login.key_id)
        if record is None or float(record.get("created_at", -1)) != login.created_at:
            raise LoginRequired("the key was revoked", clear=True)
        user = User(Access(login.key_id, narrowed(Scopes.from_record(record), login.rights)), login.expires_at)
    request.state.user = user
    return user


ConsoleUser = Annotated[User, Depends(console_user)]


def need(user: User, right: Right) -> None:
    """Raises Forbidden unless the user's key has ``right``."""
    if not user.access.scopes.has(right):
        raise Forbidden(user.access.refuse_right(right))


def need_session(user: User, session: str | None, right: Right = Right.READ) -> None:
    """Raises Forbidden unless the user's key has ``right`` and may use ``session`` (None: the default program)."""
    need(user, right)
    if not user.access.scopes.allows(session):
        raise Forbidden(user.access.refuse_session(session))
