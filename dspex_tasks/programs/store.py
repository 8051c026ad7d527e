"""The session program store: versioned JSON program state per (session, program).

``ProgramStore`` keeps it in Redis, each write one atomic Lua script that bumps
the version, stores the record, indexes the session and publishes an
invalidation for worker caches. ``MemoryProgramStore`` is its in-memory twin
for unit tests. State is JSON only, never pickle.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .. import keys, wire
from ..connections import register_lua
from ..dsl.signature import SignatureRegistry
from ..dsl.signature import registry as default_registry
from ..errors import ProgramNotFound, ValidationError

__all__ = ["ProgramRecord", "ProgramStoreProtocol", "ProgramStore", "MemoryProgramStore", "check_state",
           "predictor_states", "check_fits", "PREDICTOR_KEYS", "PROGRAM_KEYS", "SHORT_FORM_KEYS",
           "SINGLE_PREDICTOR_KEYS"]

DEFAULT_MAX_STATE_BYTES = 2_000_000
#: The predictor names of a signature's or program's module, by name; None when unknown.
PredictorsOf = Callable[[str], "Sequence[str] | None"]
# The stores have a ``list`` method, which shadows the builtin inside their class bodies.
Names = list[str]
Versions = list[int]


@dataclass(frozen=True)
class ProgramRecord:
    """One stored program version."""

    state: dict[str, Any]
    version: int
    signature: str | None
    updated_at: float
    session: str = ""
    program: str = ""


def check_state(state: Any, max_bytes: int = DEFAULT_MAX_STATE_BYTES) -> str:
    """Validate program state and return its JSON text.

    Raises:
        ValidationError: when the state is not a JSON object or is too large.
    """
    if not isinstance(state, dict):
        raise ValidationError.from_errors(
            "program state", [{"field": "state", "message": f"expected a JSON object, got {type(state).__name__}"}]
        )
    wire.check_json(state, "state", what="program state")  # NaN: json.dumps below refuses it
    try:
        text = json.dumps(state, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError.from_errors("program state", [{"field": "state", "message": f"not JSON: {exc}"}]) from None
    if len(text) > max_bytes:
        raise ValidationError.from_errors(
            "program state", [{"field": "state", "message": f"{len(text)} bytes exceeds the {max_bytes}-byte limit"}]
        )
    return text


# Keys of one predictor's state: DSPy's ``Predict.dump_state()`` (``extended_signature`` from DSPy 2.5's
# ChainOfThought) and the short form's ``instructions``.
PREDICTOR_KEYS = frozenset({"demos", "instructions", "signature", "extended_signature", "traces", "train", "lm"})
# Keys DSPy's ``Module.save()`` writes next to the predictors (``metadata``: dependency versions).
PROGRAM_KEYS = frozenset({"metadata"})
# Top-level keys that make the state the short form (or a ``Predict``'s own ``dump_state()``).
SHORT_FORM_KEYS = ("demos", "instructions", "signature")
# Where the one predictor of a single-predictor module may also find its state: every module's name for it.
SINGLE_PREDICTOR_KEYS = ("self", "predict")


def predictor_states(state: dict[str, Any], predictors: Sequence[str], *,
                     module: str = "the module") -> dict[str, tuple[str, dict[str, Any]]]:
    """Predictor -> (the key of its part of ``state``, ``""`` for the top level; that part).

    A predictor missing from the result takes nothing (a single-predictor module only: a module with
    several predictors needs every one's entry).

    ``state`` is DSPy's ``dump_state()`` (``{"<predictor>": {...}}``, a ``Predict``'s own state at the top,
    maybe with ``save()``'s ``metadata``) or the short form ``{"demos": [...], "instructions": ...}``, which
    applies to every predictor without a state of its own. The one predictor of a single-predictor module
    also takes a state under ``self`` or ``predict``, the names ``Predict`` and ``ChainOfThought`` give it
    (its own name first), so either module's ``dump_state()`` fits the other. Keys that do not hold an
    object are left alone (never applied).

    Raises:
        ValidationError: naming each key that holds the state of a predictor the module does not have
            (e.g. ``retrieve`` of a saved RAG program) with the predictors it has, and each predictor's
            key that holds something other than an object, and, for several predictors, each one missing;
            demos that are not a list of objects, instructions that are not a string.
    """
    names = list(predictors)
    single = len(names) == 1
    errs: list[dict[str, str]] = []
    known = {*names, *(SINGLE_PREDICTOR_KEYS if single else ())}
    for key, value in state.items():
        if key in known:
            if not isinstance(value, dict):
                errs.append({"field": key, "message": "expected an object: the state of a predictor"})
        elif isinstance(value, dict) and key not in PREDICTOR_KEYS and key not in PROGRAM_KEYS:
            if single:
                has = (f"one predictor, '{names[0]}' (its state goes at the top level or under "
                       + " or ".join(f"'{k}'" for k in SINGLE_PREDICTOR_KEYS) + ")")
            else:
                has = "the predictors " + (", ".join(f"'{n}'" for n in names) or "none")
            errs.append({"field": key, "message": f"unknown predictor '{key}'; {module} has {has}"})
    top = any(k in state for k in SHORT_FORM_KEYS)
    if not single and not errs:
        # Several predictors: DSPy's own layout, one entry each (as dump_state() and save() write it).
        # DSPy's load_state would skip a missing one silently; a short form would give every predictor
        # the same demos, whatever its fields.
        listed = ", ".join(f"'{n}'" for n in names)
        for name in names:
            if name not in state:
                why = ("the short form ({demos, instructions}) fits one predictor only" if top and not
                       any(n in state for n in names) else "every predictor needs its entry, as dump_state() writes")
                errs.append({"field": name, "message": f"missing the state of predictor '{name}' ({module} has "
                                                       f"{listed}; {why})"})
    if errs:
        raise ValidationError.from_errors("program state", errs)
    parts: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in names:
        own = next((k for k in (name, *(SINGLE_PREDICTOR_KEYS if single else ())) if k in state), None)
        if own is not None:
            parts[name] = (own, state[own])
        elif top:
            parts[name] = ("", state)
    checked = {key: part for key, part in parts.values()}
    if top:  # the short form's fields are checked even where a predictor's own entry wins over them
        checked.setdefault("", state)
    for key, part in checked.items():
        where = f"{key}." if key else ""
        demos = part.get("demos", [])
        if not isinstance(demos, list) or not all(isinstance(d, dict) for d in demos):
            errs.append({"field": f"{where}demos", "message": "expected a list of objects (one per demo)"})
        if "instructions" in part and not isinstance(part["instructions"], str):
            errs.append({"field": f"{where}instructions", "message": "expected a string"})
    if errs:
        raise ValidationError.from_errors("program state", errs)
    return parts


def check_fits(state: dict[str, Any], name: str, signatures: SignatureRegistry | PredictorsOf) -> None:
    """Refuse ``state`` that does not fit the module of signature or program ``name`` when its predictors are known.

    ``signatures`` is a registry of this process, or a function giving the predictor names workers published
    (the client's: it has neither dspy nor the program code). Only the layout is checked
    (:func:`predictor_states`); an unknown name is not checked here (workers refuse such state when they load).
    """
    predictors: Sequence[str] | None
    if isinstance(signatures, SignatureRegistry):
        sig = signatures.find(name)
        predictors = sig.predictors if sig is not None else None
    else:
        predictors = signatures(name)
    if predictors is not None:
        predictor_states(state, list(predictors), module=f"'{name}'")


class ProgramStoreProtocol(Protocol):
    def put(self, session: str, program: str, state: dict[str, Any], *, signature: str | None = None,
            token: str | None = None) -> int: ...
    def get(self, session: str, program: str, version: int | None = None) -> ProgramRecord: ...
    def current_version(self, session: str, program: str) -> int: ...
    def list(self, session: str) -> Names: ...
    def delete(self, session: str, program: str) -> None: ...
    def history(self, session: str, program: str) -> Versions: ...
    def rollback(self, session: str, program: str, version: int) -> int: ...
    def sessions(self) -> Names: ...
    def delete_session(self, session: str) -> None: ...






def _message_prefix(session: str, program: str) -> str:
    # ids are restricted to [A-Za-z0-9._:-], so no JSON escaping is needed.
    return f'{{"session":"{session}","program":"{program}","version":'


class ProgramStore:
    """Versioned program state in Redis.

    Args:
        redis: a ``redis.Redis`` client (``decode_responses`` either way).
        namespace: key prefix (``DSPEX_NAMESPACE``).
        session_ttl_s: expire a session's program keys this long after their last write.
        max_state_bytes: reject larger states.
        signatures: the signatures whose modules a state must fit (default: the process-wide registry);
            ``put`` refuses, before writing, a state naming predictors the module of its signature (or of
            the signature named like the program) does not have.

    Example:
        >>> store = ProgramStore(redis=connections.redis_client(settings))  # doctest: +SKIP
        >>> v = store.put("t42", "qa", {"demos": []}, signature="qa")  # doctest: +SKIP
    """

    def __init__(self, *, redis: Any, namespace: str = "dspex", session_ttl_s: int | None = None,
                 max_state_bytes: int = DEFAULT_MAX_STATE_BYTES,
                 signatures: SignatureRegistry | PredictorsOf | None = None) -> None:
        self.redis = redis
        self.ns = namespace
        self.session_ttl_s = session_ttl_s
        self.max_state_bytes = max_state_bytes
        self.signatures: SignatureRegistry | PredictorsOf = default_registry if signatures is None else signatures
        self._put = register_lua(redis, __name__, "store_put")
        self._rollback = register_lua(redis, __name__, "store_rollback")
        self._get = register_lua(redis, __name__, "store_get")

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> ProgramStore:
        from ..connections import redis_client
        from ..settings import load_settings

        return cls(redis=redis_client(load_settings(redis_url=url)), **kwargs)

    def _keys(self, session: str, program: str) -> tuple[str, str]:
        keys.check_id(session, "session")
        keys.check_id(program, "program")
        return keys.program_meta(self.ns, session, program), keys.program_versions(self.ns, session, program)

    def put(self, session: str, program: str, state: dict[str, Any], *, signature: str | None = None,
            token: str | None = None) -> int:
        """Store ``state`` as the next version and make it current.

        ``token`` makes the write idempotent: a second put with the same token
        returns the first one's version and writes nothing.
        """
        meta, versions = self._keys(session, program)
        text = check_state(state, self.max_state_bytes)
        check_fits(state, signature or program, self.signatures)
        if token is not None:
            keys.check_id(token, "token")
        now = time.time()
        record = f'{{"state":{text},"signature":{json.dumps(signature)},"updated_at":{now!r}}}'
        token_key = keys.program_token(self.ns, session, program, token) if token else ""
        return int(self._put(
            keys=[meta, versions, keys.session_programs(self.ns, session), keys.sessions(self.ns), token_key],
            args=[record, signature or "", repr(now), program, session, keys.program_events(self.ns),
                  self.session_ttl_s or 0, _message_prefix(session, program)],
        ))

    def get(self, session: str, program: str, version: int | None = None) -> ProgramRecord:
        """The current (or a given) version. Raises ProgramNotFound."""
        meta, versions = self._keys(session, program)
        raw, v = self._get(keys=[meta, versions], args=[int(version or 0)])
        if not raw:
            what = f"version {version} of " if version else ""
            raise ProgramNotFound(f"no {what}program '{program}' in session '{session}'")
        data = json.loads(raw)
        return ProgramRecord(state=data["state"], version=int(v), signature=data.get("signature"),
                             updated_at=float(data["updated_at"]), session=session, program=program)

    def current_version(self, session: str, program: str) -> int:
        """The current version, 0 when nothing is stored (one HGET)."""
        meta, _ = self._keys(session, program)
        v = self.redis.hget(meta, "current")
        return int(v) if v else 0

    def list(self, session: str) -> Names:
        keys.check_id(session, "session")
        return sorted(_s(m) for m in self.redis.smembers(keys.session_programs(self.ns, session)))

    def history(self, session: str, program: str) -> Versions:
        _, versions = self._keys(session, program)
        return sorted(int(v) for v in self.redis.hkeys(versions))

    def rollback(self, session: str, program: str, version: int) -> int:
        """Make an earlier version current again (history is kept). Raises ProgramNotFound."""
        meta, versions = self._keys(session, program)
        v = int(self._rollback(keys=[meta, versions], args=[int(version), repr(time.time()),
                                                             keys.program_events(self.ns),
                                                             _message_prefix(session, program)]))
        if v == 0:
            raise ProgramNotFound(f"no version {version} of program '{program}' in session '{session}'")
        return v

    def delete(self, session: str, program: str) -> None:
        meta, versions = self._keys(session, program)
        pipe = self.redis.pipeline()
        pipe.delete(meta, versions)
        pipe.srem(keys.session_programs(self.ns, session), program)
        pipe.publish(keys.program_events(self.ns), _message_prefix(session, program) + "0}")
        pipe.execute()

    def sessions(self) -> Names:
        """Sessions, most recently written or used first."""
        return [_s(s) for s in self.redis.zrevrange(keys.sessions(self.ns), 0, -1)]

    def recent_sessions(self, limit: int) -> Names:
        return [_s(s) for s in self.redis.zrevrange(keys.sessions(self.ns), 0, max(limit, 1) - 1)] if limit else []

    def touch(self, sessions: dict[str, float]) -> None:
        """Record use times (batched by worker caches, never per task)."""
        if sessions:
            self.redis.zadd(keys.sessions(self.ns), sessions, gt=True)

    def delete_session(self, session: str) -> None:
        for program in self.list(session):
            self.delete(session, program)
        pipe = self.redis.pipeline()
        pipe.delete(keys.session_programs(self.ns, session))
        pipe.zrem(keys.sessions(self.ns), session)
        pipe.execute()


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class MemoryProgramStore:
    """The in-memory twin of :class:`ProgramStore` (same API and errors), for tests."""

    def __init__(self, *, max_state_bytes: int = DEFAULT_MAX_STATE_BYTES,
                 signatures: SignatureRegistry | None = None) -> None:
        self.max_state_bytes = max_state_bytes
        self.signatures = default_registry if signatures is None else signatures
        self._programs: dict[tuple[str, str], dict[str, Any]] = {}
        self._sessions: dict[str, float] = {}
        self._tokens: dict[tuple[str, str, str], int] = {}
        self._lock = threading.Lock()

    def _entry(self, session: str, program: str) -> dict[str, Any] | None:
        keys.check_id(session, "session")
        keys.check_id(program, "program")
        return self._programs.get((session, program))

    def put(self, session: str, program: str, state: dict[str, Any], *, signature: str | None = None,
            token: str | None = None) -> int:
        with self._lock:
            entry = self._entry(session, program)
            text = check_state(state, self.max_state_bytes)
            check_fits(state, signature or program, self.signatures)
            if token is not None and (session, program, keys.check_id(token, "token")) in self._tokens:
                return self._tokens[(session, program, token)]
            if entry is None:
                entry = self._programs[(session, program)] = {"latest": 0, "current": 0, "versions": {}}
            entry["latest"] += 1
            v = entry["current"] = entry["latest"]
            now = time.time()
            entry["versions"][v] = ProgramRecord(json.loads(text), v, signature, now, session, program)
            self._sessions[session] = now
            if token is not None:
                self._tokens[(session, program, token)] = v
            return int(v)

    def get(self, session: str, program: str, version: int | None = None) -> ProgramRecord:
        entry = self._entry(session, program)
        v = version or (entry["current"] if entry else 0)
        if entry is None or v not in entry["versions"]:
            what = f"version {version} of " if version else ""
            raise ProgramNotFound(f"no {what}program '{program}' in session '{session}'")
        rec: ProgramRecord = entry["versions"][v]
        return ProgramRecord(json.loads(json.dumps(rec.state)), rec.version, rec.signature, rec.updated_at,
                             session, program)

    def current_version(self, session: str, program: str) -> int:
        entry = self._entry(session, program)
        return int(entry["current"]) if entry else 0

    def list(self, session: str) -> Names:
        keys.check_id(session, "session")
        return sorted(p for (s, p) in self._programs if s == session)

    def history(self, session: str, program: str) -> Versions:
        entry = self._entry(session, program)
        return sorted(entry["versions"]) if entry else []

    def rollback(self, session: str, program: str, version: int) -> int:
        with self._lock:
            entry = self._entry(session, program)
            if entry is None or version not in entry["versions"]:
                raise ProgramNotFound(f"no version {version} of program '{program}' in session '{session}'")
            entry["current"] = version
            return version

    def delete(self, session: str, program: str) -> None:
        with self._lock:
            self._entry(session, program)
            self._programs.pop((session, program), None)

    def sessions(self) -> Names:
        return [s for s, _ in sorted(self._sessions.items(), key=lambda kv: -kv[1])]

    def recent_sessions(self, limit: int) -> Names:
        return self.sessions()[:limit]

    def touch(self, sessions: dict[str, float]) -> None:
        for s, t in sessions.items():
            self._sessions[s] = max(t, self._sessions.get(s, 0.0))

    def delete_session(self, session: str) -> None:
        with self._lock:
            keys.check_id(session, "session")
            for key in [k for k in self._programs if k[0] == session]:
                del self._programs[key]
            self._sessions.pop(session, None)
