"""API keys for the HTTP gateway: created once, stored only as a SHA-256 hash, rate-limited per key.

A key reads ``dsk_<id>_<secret>``: the id (8 hex) names the key in listings and its rate bucket, the
secret (43 URL-safe characters, 256 bits) is never stored. Redis keeps ``sha256(key) -> {id, name,
created_at, rate_per_min}`` in one hash (``keys.gateway_api_keys``); one Lua script checks the hash and
takes a token from the key's bucket (``keys.gateway_rate``) in one round trip per request.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .. import keys
from ..connections import lua
from ..errors import ApiKeyNotFound, ValidationError

__all__ = ["ApiKey", "AuthResult", "KeyStore", "RequestLimiter", "hash_key", "key_from_headers"]

_KEY = re.compile(r"^dsk_([0-9a-f]{8})_[A-Za-z0-9_-]{20,128}$")
_NAME = re.compile(r"^[A-Za-z0-9._:@ -]{1,64}$")


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def key_from_headers(headers: dict[str, str]) -> str | None:
    """The presented key: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key", "").strip() or None


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    created_at: float
    rate_per_min: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "created_at": self.created_at, "rate_per_min": self.rate_per_min}


Keys = list[ApiKey]  # ``KeyStore.list`` shadows the builtin inside the class body


class KeyStore:
    """Create, list and revoke keys (synchronous; the CLI and tests use it)."""

    def __init__(self, *, redis: Any, namespace: str) -> None:
        self.redis = redis
        self.ns = namespace

    def create(self, name: str, *, rate_per_min: int | None = None) -> tuple[str, ApiKey]:
        """A new key; returns (the raw key, shown once, and its record)."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValidationError.from_errors("key", [{"field": "name", "message": "1-64 characters of "
                                                                                   "[A-Za-z0-9._:@ -]"}])
        if rate_per_min is not None and rate_per_min < 0:
            raise ValidationError.from_errors("key", [{"field": "rate_per_min", "message": "must be >= 0"}])
        key_id = secrets.token_hex(4)
        raw = f"dsk_{key_id}_{secrets.token_urlsafe(32)}"
        record = ApiKey(key_id, name, time.time(), rate_per_min)
        self.redis.hset(keys.gateway_api_keys(self.ns), hash_key(raw), json.dumps(record.to_json()))
        return raw, record

    def _all(self) -> list[tuple[str, ApiKey]]:
        raw = self.redis.hgetall(keys.gateway_api_keys(self.ns))
        out = []
        for digest, value in raw.items():
            data = json.loads(value)
            out.append((digest.decode() if isinstance(digest, bytes) else str(digest),
                        ApiKey(data["id"], data["name"], float(data["created_at"]), data.get("rate_per_min"))))
        return sorted(out, key=lambda kv: kv[1].created_at)

    def list(self) -> Keys:
        return [k for _, k in self._all()]

    def revoke(self, id_or_name: str) -> Keys:
        """Revoke the key with this id, or every key with this name. Raises ApiKeyNotFound when none."""
        found = [(d, k) for d, k in self._all() if id_or_name in (k.id, k.name)]
        if not found:
            raise ApiKeyNotFound(f"no API key with id or name '{id_or_name}'")
        pipe = self.redis.pipeline()
        for digest, key in found:
            pipe.hdel(keys.gateway_api_keys(self.ns), digest)
            pipe.delete(keys.gateway_rate(self.ns, key.id))
        pipe.execute()
        return [k for _, k in found]




@dataclass(frozen=True)
class AuthResult:
    ok: bool
    limited: bool
    key_id: str
    retry_after_s: int = 0
    limit: int = 0
    remaining: int = 0


class RequestLimiter:
    """Checks a presented key and takes one request from its bucket (async, one round trip).

    Per API key and per request, at the gateway; not the LM's fleet-wide limits
    (:class:`dspex_tasks.lm.ratelimit.RateLimiter`).
    """

    def __init__(self, *, namespace: str, default_rate_per_min: int) -> None:
        self.ns = namespace
        self.default_rate = default_rate_per_min
        self._script = lua(__name__, "api_key_check")
        self._sha: str | None = None

    async def check(self, aredis: Any, raw_key: str | None) -> AuthResult:
        """``raw_key`` None means auth is off: the anonymous bucket is used."""
        if raw_key is not None:
            m = _KEY.match(raw_key)
            if not m:
                return AuthResult(ok=False, limited=False, key_id="")
            digest, bucket_id = hash_key(raw_key), m.group(1)
        else:
            digest, bucket_id = "", "anonymous"
        args = [digest, self.default_rate, bucket_id]
        key_names = [keys.gateway_api_keys(self.ns), keys.gateway_rate(self.ns, bucket_id)]
        reply = await self._eval(aredis, key_names, args)
        status, wait_ms, key_id, limit, remaining = (int(reply[0]), int(reply[1]), reply[2], int(reply[3]),
                                                     int(reply[4]))
        key_id = key_id.decode() if isinstance(key_id, bytes) else str(key_id)
        if status == 0:
            return AuthResult(ok=False, limited=False, key_id="")
        return AuthResult(ok=True, limited=status == 1, key_id=key_id, retry_after_s=max(1, -(-wait_ms // 1000)),
                          limit=limit, remaining=remaining)

    async def _eval(self, aredis: Any, key_names: list[str], args: list[Any]) -> Any:
        from redis.exceptions import NoScriptError

        if self._sha is None:
            self._sha = await aredis.script_load(self._script)
        try:
            return await aredis.evalsha(self._sha, len(key_names), *key_names, *args)
        except NoScriptError:  # a restarted or flushed server
            self._sha = await aredis.script_load(self._script)
            return await aredis.evalsha(self._sha, len(key_names), *key_names, *args)
