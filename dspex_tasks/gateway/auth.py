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
from ..errors import ProgramNotFound, ValidationError

__all__ = ["ApiKey", "AuthResult", "KeyStore", "RateLimiter", "hash_key", "key_from_headers"]

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
        """Revoke the key with this id, or every key with this name. Raises ProgramNotFound when none."""
        found = [(d, k) for d, k in self._all() if id_or_name in (k.id, k.name)]
        if not found:
            raise ProgramNotFound(f"no API key with id or name '{id_or_name}'")
        pipe = self.redis.pipeline()
        for digest, key in found:
            pipe.hdel(keys.gateway_api_keys(self.ns), digest)
            pipe.delete(keys.gateway_rate(self.ns, key.id))
        pipe.execute()
        return [k for _, k in found]


# KEYS: api key hash, bucket; ARGV: digest ('' = no auth), default rate/min, bucket id
# -> {status (0 unknown key, 1 limited, 2 ok), retry_after_ms, key id, limit, remaining}
_CHECK = """
local rate = tonumber(ARGV[2])
local id = ARGV[3]
if ARGV[1] ~= '' then
  local rec = redis.call('HGET', KEYS[1], ARGV[1])
  if not rec then return {0, 0, '', 0, 0} end
  local ok, data = pcall(cjson.decode, rec)
  if ok and type(data) == 'table' then
    if type(data['rate_per_min']) == 'number' then rate = data['rate_per_min'] end
    if type(data['id']) == 'string' then id = data['id'] end
  end
end
if rate <= 0 then return {2, 0, id, 0, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local per_ms = rate / 60000
local b = redis.call('HMGET', KEYS[2], 'tokens', 'ts')
local tokens = tonumber(b[1]) or rate
local ts = tonumber(b[2]) or now
tokens = math.min(rate, tokens + math.max(0, now - ts) * per_ms)
local status = 2
local wait = 0
if tokens < 1 then
  status = 1
  wait = math.ceil((1 - tokens) / per_ms)
else
  tokens = tokens - 1
end
redis.call('HSET', KEYS[2], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[2], math.ceil(60000 + 1 / per_ms))
return {status, wait, id, rate, math.floor(tokens)}
"""


@dataclass(frozen=True)
class AuthResult:
    ok: bool
    limited: bool
    key_id: str
    retry_after_s: int = 0
    limit: int = 0
    remaining: int = 0


class RateLimiter:
    """Checks a presented key and takes one request from its bucket (async, one round trip)."""

    def __init__(self, *, namespace: str, default_rate_per_min: int) -> None:
        self.ns = namespace
        self.default_rate = default_rate_per_min
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
            self._sha = await aredis.script_load(_CHECK)
        try:
            return await aredis.evalsha(self._sha, len(key_names), *key_names, *args)
        except NoScriptError:  # a restarted or flushed server
            self._sha = await aredis.script_load(_CHECK)
            return await aredis.evalsha(self._sha, len(key_names), *key_names, *args)
