"""API key scopes: the rights a gateway key has and the sessions it may use (no FastAPI here; the CLI imports it).

A key carries ``rights``, a subset of:

* ``read``: the registry (``GET /v1/signatures...``), its own jobs (state, result, events), the programs,
  history and runs of its sessions, and the session list (filtered to its sessions);
* ``write``: submit jobs (``.../jobs``, ``...:run``) and cancel its own, put programs and roll them back, start
  and cancel optimization runs, and name stored datasets, all in its sessions;
* ``admin``: everything, in every session: also deleting a program (its history goes) or a whole session,
  jobs submitted outside the gateway, and every key's jobs and dry runs.

and ``sessions``, a list of patterns: ``team-a`` (that session), ``team-a*`` (every session whose name starts
with ``team-a``: ``team-a``, ``team-a:1``, ``team-ab``; the star is only ever last), ``*`` (every session and
the default program), ``@default`` (the default program: a job or run with no session). A dataset a run names
must match a pattern too (name them after the session: ``team-a:train``). ``admin`` ignores the patterns.

A new key gets ``read, write`` on ``@default``: it runs the stateless default programs and reads its own jobs,
and nothing else until an operator grants more (``dspex keys grant ID --sessions ... --rights ...``).
A record stored before scopes existed has neither field: a *legacy* key, which keeps the full access it had.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..errors import ValidationError

__all__ = ["ANY", "DEFAULT_SESSION", "DEFAULT_RIGHTS", "DEFAULT_SESSIONS", "Access", "Right", "Scopes", "grant_hint",
           "matches", "parse_rights", "parse_sessions", "session_label"]


class Right(StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


#: The pattern naming the default program (no session). ``@`` is outside the session alphabet: no clash.
DEFAULT_SESSION = "@default"
ANY = "*"
DEFAULT_RIGHTS: tuple[Right, ...] = (Right.READ, Right.WRITE)
DEFAULT_SESSIONS: tuple[str, ...] = (DEFAULT_SESSION,)

_ORDER = {r: i for i, r in enumerate(Right)}
_RIGHTS = frozenset(r.value for r in Right)
_PATTERN = re.compile(r"(?:@default|\*|[A-Za-z0-9._:-]{1,128}\*?)")


def _items(values: str | Iterable[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> stripped, non-empty items, first occurrence kept."""
    parts = [values] if isinstance(values, str) else list(values)
    out: list[str] = []
    for part in parts:
        for item in str(part).split(","):
            item = item.strip()
            if item and item not in out:
                out.append(item)
    return out


def parse_rights(values: str | Iterable[str]) -> tuple[Right, ...]:
    """Rights in their canonical order. Raises ValidationError for an unknown right or none at all."""
    items = _items(values)
    bad = [v for v in items if v not in _RIGHTS]
    if bad or not items:
        what = f"unknown right '{bad[0]}'" if bad else "at least one right is needed"
        raise ValidationError.from_errors("key", [{"field": "rights", "message": f"{what}; rights are "
                                                   f"{', '.join(r.value for r in Right)}"}])
    return tuple(sorted({Right(v) for v in items}, key=_ORDER.__getitem__))


def parse_sessions(values: str | Iterable[str]) -> tuple[str, ...]:
    """Session patterns, in the given order. Raises ValidationError naming a malformed one (an empty list is fine:
    a key that may use no session at all)."""
    items = _items(values)
    bad = [v for v in items if not _PATTERN.fullmatch(v)]
    if bad:
        raise ValidationError.from_errors("key", [{"field": "sessions", "message": (
            f"bad session pattern '{bad[0]}': a session id (1-128 of [A-Za-z0-9._:-]), a prefix ending in one "
            f"'*' (team-a*), '*' (every session) or '{DEFAULT_SESSION}' (the default program)")}])
    return tuple(items)


def matches(pattern: str, session: str | None) -> bool:
    """Whether ``pattern`` covers ``session`` (None: the default program)."""
    if pattern == ANY:
        return True
    if session is None:
        return pattern == DEFAULT_SESSION
    if pattern.endswith("*"):
        return session.startswith(pattern[:-1])
    return session == pattern


def session_label(session: str | None) -> str:
    """How a refusal names a session: its id, or ``@default`` for the default program."""
    return DEFAULT_SESSION if session is None else session


@dataclass(frozen=True)
class Scopes:
    """What one key may do: its rights and session patterns (``legacy``: stored before scopes, full access)."""

    rights: frozenset[Right]
    sessions: tuple[str, ...]
    legacy: bool = False

    @classmethod
    def full(cls, *, legacy: bool = False) -> Scopes:
        return cls(frozenset({Right.ADMIN}), (ANY,), legacy)

    @classmethod
    def none(cls) -> Scopes:
        return cls(frozenset(), ())

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Scopes:
        """The scopes of a stored key record. No ``rights`` field: a legacy key. A malformed field: no access
        (fail closed)."""
        if "rights" not in data:
            return cls.full(legacy=True)
        rights, sessions = data.get("rights"), data.get("sessions")
        if not isinstance(rights, list) or not isinstance(sessions, list):
            return cls.none()
        known = frozenset(Right(r) for r in rights if r in _RIGHTS)
        return cls(known, tuple(s for s in sessions if isinstance(s, str) and _PATTERN.fullmatch(s)))

    @property
    def admin(self) -> bool:
        return Right.ADMIN in self.rights

    def has(self, right: Right) -> bool:
        """``admin`` implies every right; ``read`` and ``write`` are independent."""
        return self.admin or right in self.rights

    def allows(self, session: str | None) -> bool:
        """Whether a session (None: the default program), or a dataset name, is in scope."""
        return self.admin or any(matches(p, session) for p in self.sessions)

    def describe(self) -> tuple[str, str]:
        """(rights, sessions) as a listing shows them."""
        rights = ", ".join(sorted((r.value for r in self.rights), key=lambda v: _ORDER[Right(v)])) or "none"
        if self.legacy:
            rights = "legacy: all"
        return rights, (", ".join(self.sessions) or "none")


@dataclass(frozen=True)
class Access:
    """Who makes a request: the key id (``anonymous`` with auth off) and its scopes."""

    key_id: str
    scopes: Scopes

    def refuse_right(self, right: Right) -> str:
        have, _ = self.scopes.describe()
        return (f"this API key ({self.key_id}) lacks the '{right.value}' right (it has: {have}); "
                f"{grant_hint(self.key_id, rights=right.value)}")

    def refuse_session(self, session: str | None, *, what: str = "session") -> str:
        _, sessions = self.scopes.describe()
        label = session_label(session)
        named = "the default program (no session)" if session is None else f"{what} '{label}'"
        return (f"this API key ({self.key_id}) may not use {named} (its sessions: {sessions}); "
                f"{grant_hint(self.key_id, sessions=label)}")


def grant_hint(key_id: str, *, sessions: str | None = None, rights: str | None = None) -> str:
    """The command an operator runs to grant what a refusal names."""
    args = (f" --sessions {sessions}" if sessions else "") + (f" --rights {rights}" if rights else "")
    return f"an operator grants it with: dspex keys grant {key_id}{args}"
