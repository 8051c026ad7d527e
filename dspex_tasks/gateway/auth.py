"""API keys for the HTTP gateway: created once, stored only as a SHA-256 hash, scoped, rate-limited per key.

A key reads ``dsk_<id>_<secret>``: the id (8 hex) names the key in listings and its rate bucket, the
secret (43 URL-safe characters, 256 bits) is never stored. Redis keeps ``sha256(key) -> {id, name,
created_at, rate_per_min, rights, sessions}`` in one hash (``keys.gateway_api_keys``); one Lua script checks
the hash, takes a token from the key's bucket (``keys.gateway_rate``) and returns the record (its scopes, see
:mod:`.scopes`) in one round trip per request. A record without ``rights`` was stored before scopes: a legacy
key, with the full access it always had.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .. import keys
from ..connections import lua
from ..errors import ApiKeyNotFound, ValidationError
from .scopes import DEFAULT_RIGHTS, DEFAULT_SESSIONS, Right, Scopes, parse_rights, parse_sessions

__all__ = ["ApiKey", "AuthResult", "KeyStore", "RequestLimiter", "hash_key", "key_from_headers", "legacy_key_ids"]

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
    """A key's record. ``rights`` and ``sessions`` are None for a legacy key (stored before scopes)."""

    id: str
    name: str
    created_at: float
    rate_per_min: int | None = None
    rights: tuple[str, ...] | None = None
    sessions: tuple[str, ...] | None = None

    @property
    def legacy(self) -> bool:
        return self.rights is None

    @property
    def scopes(self) -> Scopes:
        return Scopes.from_record(self.stored())

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> ApiKey:
        rights, sessions = data.get("rights"), data.get("sessions")
        return cls(data["id"], data["name"], float(data["created_at"]), data.get("rate_per_min"),
                   None if rights is None else tuple(rights), None if rights is None else tuple(sessions or ()))

    def stored(self) -> dict[str, Any]:
        """The record as Redis keeps it."""
        out: dict[str, Any] = {"id": self.id, "name": self.name, "created_at": self.created_at,
                               "rate_per_min": self.rate_per_min}
        if self.rights is not None:
            out.update(rights=list(self.rights), sessions=list(self.sessions or ()))
        return out

    def to_json(self) -> dict[str, Any]:
        """The record as listings show it: a legacy key with its effective scopes (admin, every session)."""
        scopes = self.scopes
        rights = [r.value for r in Right if r in scopes.rights]
        return {**self.stored(), "rights": rights, "sessions": list(scopes.sessions), "legacy": self.legacy}


def legacy_key_ids(records: list[Any]) -> list[str]:
    """The ids of the legacy keys among raw stored records (bytes or str JSON)."""
    out = []
    for raw in records:
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        if isinstance(data, dict) and "rights" not in data:
            out.append(str(data.get("id", "?")))
    return sorted(out)


Keys = list[ApiKey]  # ``KeyStore.list`` shadows the builtin inside the class body


class KeyStore:
    """Create, list and revoke keys (synchronous; the CLI and tests use it)."""

    def __init__(self, *, redis: Any, namespace: str) -> None:
        self.redis = redis
        self.ns = namespace

    def create(self, name: str, *, rate_per_min: int | None = None, sessions: str | Iterable[str] | None = None,
               rights: str | Iterable[str] | None = None) -> tuple[str, ApiKey]:
        """A new key; returns (the raw key, shown once, and its record).

        Args:
            sessions: Session patterns (``team-a``, ``team-a*``, ``*``, ``@default``; see :mod:`.scopes`).
                Default: ``@default`` only, the default program.
            rights: A subset of ``read``, ``write``, ``admin``. Default: ``read, write``.

        Example:
            >>> store.create("billing", sessions=["billing:*"], rights=["read", "write"])  # doctest: +SKIP
        """
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValidationError.from_errors("key", [{"field": "name", "message": "1-64 characters of "
                                                                                   "[A-Za-z0-9._:@ -]"}])
        if rate_per_min is not None and rate_per_min < 0:
            raise ValidationError.from_errors("key", [{"field": "rate_per_min", "message": "must be >= 0"}])
        granted = parse_rights(DEFAULT_RIGHTS if rights is None else rights)
        patterns = parse_sessions(DEFAULT_SESSIONS if sessions is None else sessions)
        key_id = secrets.token_hex(4)
        raw = f"dsk_{key_id}_{secrets.token_urlsafe(32)}"
        record = ApiKey(key_id, name, time.time(), rate_per_min, tuple(r.value for r in granted), patterns)
        self.redis.hset(keys.gateway_api_keys(self.ns), hash_key(raw), json.dumps(record.stored()))
        return raw, record

    def grant(self, id_or_name: str, *, sessions: str | Iterable[str] = (), rights: str | Iterable[str] = ()
              ) -> ApiKey:
        """Add session patterns and rights to one key (by id, or by a name only one key has); returns its record.

        Takes effect on the key's next request. Raises ApiKeyNotFound; ValidationError for a legacy key (it has
        every right already: replace it with a scoped key), a name several keys share, or a bad scope.
        """
        extra_sessions = parse_sessions(sessions)
        extra_rights = parse_rights(rights) if _has_items(rights) else ()
        if not extra_sessions and not extra_rights:
            raise ValidationError.from_errors("key", [{"field": "sessions", "message": "nothing to grant: "
                                                       "give sessions, rights or both"}])
        name = keys.gateway_api_keys(self.ns)
        result: list[ApiKey] = []

        def update(pipe: Any) -> None:
            found = [(d, k) for d, k in self._records(pipe.hgetall(name)) if id_or_name in (k.id, k.name)]
            digest, key = self._one(found, id_or_name)
            now = parse_rights([*(key.rights or ()), *(r.value for r in extra_rights)])
            new = ApiKey(key.id, key.name, key.created_at, key.rate_per_min, tuple(r.value for r in now),
                         parse_sessions([*(key.sessions or ()), *extra_sessions]))
            pipe.multi()
            pipe.hset(name, digest, json.dumps(new.stored()))
            result[:] = [new]

        self.redis.transaction(update, name)  # retried if another writer changes the hash meanwhile
        return result[0]

    @staticmethod
    def _one(found: list[tuple[str, ApiKey]], id_or_name: str) -> tuple[str, ApiKey]:
        if not found:
            raise ApiKeyNotFound(f"no API key with id or name '{id_or_name}'")
        if len(found) > 1:
            ids = ", ".join(k.id for _, k in found)
            raise ValidationError.from_errors("key", [{"field": "key", "message": f"{len(found)} keys are named "
                                                       f"'{id_or_name}' ({ids}); pass one id"}])
        digest, key = found[0]
        if key.legacy:
            raise ValidationError.from_errors("key", [{"field": "key", "message": (
                f"key {key.id} is a legacy key (stored before scopes) with every right already; create a scoped "
                f"key (dspex keys create --name ... --sessions ... --rights ...) and revoke {key.id}")}])
        return digest, key

    @staticmethod
    def _records(raw: dict[Any, Any]) -> list[tuple[str, ApiKey]]:
        out = []
        for digest, value in raw.items():
            out.append((digest.decode() if isinstance(digest, bytes) else str(digest),
                        ApiKey.from_stored(json.loads(value))))
        return sorted(out, key=lambda kv: kv[1].created_at)

    def _all(self) -> list[tuple[str, ApiKey]]:
        return self._records(self.redis.hgetall(keys.gateway_api_keys(self.ns)))

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


def _has_items(values: str | Iterable[str]) -> bool:
    return bool(values.strip(", ") if isinstance(values, str) else [v for v in values if str(v).strip(", ")])


@dataclass(frozen=True)
class AuthResult:
    ok: bool
    limited: bool
    key_id: str
    retry_after_s: int = 0
    limit: int = 0
    remaining: int = 0
    scopes: Scopes = Scopes.none()


def _scopes(record: Any) -> Scopes:
    """The scopes in a record the check script returned; an unreadable one grants nothing."""
    try:
        data = json.loads(record)
    except (TypeError, ValueError):
        return Scopes.none()
    return Scopes.from_record(data) if isinstance(data, dict) else Scopes.none()


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
        """``raw_key`` None means auth is off: the anonymous bucket is used, with full access (loopback only)."""
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
                          limit=limit, remaining=remaining,
                          scopes=_scopes(reply[5]) if raw_key is not None else Scopes.full())

    async def _eval(self, aredis: Any, key_names: list[str], args: list[Any]) -> Any:
        from redis.exceptions import NoScriptError

        if self._sha is None:
            self._sha = await aredis.script_load(self._script)
        try:
            return await aredis.evalsha(self._sha, len(key_names), *key_names, *args)
        except NoScriptError:  # a restarted or flushed server
            self._sha = await aredis.script_load(self._script)
            return await aredis.evalsha(self._sha, len(key_names), *key_names, *args)
