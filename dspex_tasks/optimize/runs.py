"""Optimization runs in Redis: the record, checkpoints, once-only flags, the lease and the event stream.

dspy-free: the client's :class:`OptimizationRun` handle and the worker's stages share it.
Events go to a Redis Stream per run (durable, replayable from the start, any
number of followers); the last event of a run has ``stage`` ``done``,
``failed`` or ``cancelled``.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .. import keys, wire
from ..connections import register_lua
from ..errors import Cancelled, NotFound, RunNotFound, TaskTimeout, from_remote

__all__ = ["RunStore", "RunRecord", "RunStatus", "Stage", "OptimizationRun", "TERMINAL", "END_STAGES", "start_run", "send_stage"]


class RunStatus(StrEnum):
    """Where a run is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


class Stage(StrEnum):
    """A run's stages in order (``load`` ... ``decide``), and the stages its events end with."""

    QUEUED = "queued"
    LOAD = "load"
    BASELINE = "baseline"
    COMPILE = "compile"
    CANDIDATE = "candidate"
    DECIDE = "decide"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})
END_STAGES = frozenset({Stage.DONE, Stage.FAILED, Stage.CANCELLED})
_STREAM_MAXLEN = 20_000


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass
class RunRecord:
    """One run's record (a Redis hash of JSON values; :meth:`to_json` is what clients and the API see)."""

    run_id: str
    status: RunStatus
    stage: str
    created_at: float
    signature: str
    session: str
    program: str
    optimizer: str
    metric: str
    params: dict[str, Any] = field(default_factory=dict)
    dataset: str = ""
    scheduled: bool = False
    schedule: str = ""
    lm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    best_score: float | None = None
    baseline_score: float | None = None
    candidate_score: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False
    trials: list[float] | None = None
    summary: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # fields this version does not know (kept, shown)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        known["status"] = RunStatus(known.get("status", RunStatus.QUEUED))
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def to_json(self) -> dict[str, Any]:
        """The record as JSON (unset optional fields left out, as stored)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and f.name not in ("best_score",):
                continue
            if f.name == "cancel_requested" and not value:
                continue
            out[f.name] = str(value) if isinstance(value, StrEnum) else value
        return {**out, **self.extra}


class RunStore:
    """Everything a run keeps in Redis, under ``keys.run*``."""

    def __init__(self, *, redis: Any, namespace: str = "dspex", retention_s: int = 30 * 86400) -> None:
        self.redis = redis
        self.ns = namespace
        self.retention_s = retention_s
        self._renew = register_lua(redis, __name__, "lease_renew")
        self._release = register_lua(redis, __name__, "lease_release")

    # -- record ---------------------------------------------------------------
    def create(self, spec: dict[str, Any]) -> str:
        run_id = spec.get("run_id") or uuid.uuid4().hex
        keys.check_id(run_id, "run")
        now = time.time()
        record = RunRecord(
            run_id=run_id, status=RunStatus.QUEUED, stage=Stage.QUEUED, created_at=now,
            signature=spec["signature"], session=spec.get("session") or "", program=spec["program"],
            optimizer=spec["optimizer"], metric=spec["metric"], params=spec.get("params") or {},
            dataset=spec.get("dataset") or "", scheduled=bool(spec.get("scheduled")),
            schedule=spec.get("schedule") or "").to_json()
        pipe = self.redis.pipeline()
        pipe.hset(keys.run(self.ns, run_id), mapping={k: json.dumps(v) for k, v in record.items()})
        pipe.expire(keys.run(self.ns, run_id), self.retention_s)
        pipe.zadd(keys.runs(self.ns), {run_id: now})
        if spec.get("session"):
            pipe.zadd(keys.session_runs(self.ns, spec["session"]), {run_id: now})
        pipe.execute()
        return str(run_id)

    def get(self, run_id: str) -> RunRecord:
        """The run's record. Raises RunNotFound."""
        keys.check_id(run_id, "run")
        raw = self.redis.hgetall(keys.run(self.ns, run_id))
        if not raw:
            raise RunNotFound(f"no optimization run '{run_id}'")
        return RunRecord.from_json({_s(k): json.loads(v) for k, v in raw.items()})

    def update(self, run_id: str, **fields: Any) -> None:
        """Set fields of the record (names of :class:`RunRecord`; enums are stored as their values)."""
        self.redis.hset(keys.run(self.ns, run_id), mapping={
            k: json.dumps(str(v) if isinstance(v, StrEnum) else v) for k, v in fields.items()})

    def add_lm_calls(self, run_id: str, n: int) -> int:
        # a JSON number is also a valid integer for HINCRBY
        return int(self.redis.hincrby(keys.run(self.ns, run_id), "lm_calls", n)) if n else 0

    def add_usage(self, run_id: str, usage: dict[str, Any]) -> None:
        """Add what an evaluation chunk or a compile spent (a ledger total: tokens and cost) to the record."""
        key, pipe = keys.run(self.ns, run_id), self.redis.pipeline()
        for name in ("prompt_tokens", "completion_tokens"):
            if usage.get(name):
                pipe.hincrby(key, name, int(usage[name]))
        if usage.get("cost_usd"):
            pipe.hincrbyfloat(key, "cost_usd", float(usage["cost_usd"]))
        pipe.execute()

    def ids(self, session: str | None = None, limit: int = 50) -> list[str]:
        """Newest first; ids whose record expired are dropped from the index on the way."""
        key = keys.session_runs(self.ns, keys.check_id(session)) if session else keys.runs(self.ns)
        ids = [_s(r) for r in self.redis.zrevrange(key, 0, limit - 1)]
        pipe = self.redis.pipeline()
        for run_id in ids:
            pipe.exists(keys.run(self.ns, run_id))
        alive = pipe.execute()
        gone = [r for r, ok in zip(ids, alive, strict=True) if not ok]
        if gone:
            self.redis.zrem(key, *gone)
        return [r for r, ok in zip(ids, alive, strict=True) if ok]

    # -- checkpoints and once-only flags -------------------------------------------
    def checkpoint(self, run_id: str, name: str) -> Any:
        raw = self.redis.get(keys.run_checkpoint(self.ns, run_id, name))
        return None if raw is None else json.loads(raw)

    def save_checkpoint(self, run_id: str, name: str, value: Any) -> bool:
        """Store a stage's output once; a second writer (a redelivered stage) does not overwrite it."""
        return bool(self.redis.set(keys.run_checkpoint(self.ns, run_id, name), json.dumps(value),
                                   nx=True, ex=self.retention_s))

    def candidate(self, run_id: str) -> dict[str, Any]:
        """The candidate program state the run compiled (DSPy ``dump_state()`` JSON).

        Kept as long as the run's record: the checkpoint is written after the record, with the same retention.

        Raises:
            RunNotFound: no such run (or it expired).
            NotFound: the run has no candidate (yet: it exists once the compile stage finished).
        """
        rec = self.get(run_id)
        cand = self.checkpoint(run_id, "candidate")
        if not isinstance(cand, dict) or cand.get("state") is None:
            raise NotFound(f"run {run_id} has no candidate program ({rec.status}, stage {rec.stage}); "
                           "it exists once the compile stage finished")
        state: dict[str, Any] = cand["state"]
        return state

    def once(self, run_id: str, name: str) -> bool:
        """True for the first caller only (e.g. to enqueue the next stage exactly once)."""
        return bool(self.redis.set(keys.run_flag(self.ns, run_id, name), "1", nx=True, ex=self.retention_s))

    # -- lease ----------------------------------------------------------------------
    def acquire_lease(self, run_id: str, token: str, ttl_s: float) -> bool:
        return bool(self.redis.set(keys.run_lease(self.ns, run_id), token, nx=True, px=int(ttl_s * 1000)))

    def renew_lease(self, run_id: str, token: str, ttl_s: float) -> bool:
        return bool(self._renew(keys=[keys.run_lease(self.ns, run_id)], args=[token, int(ttl_s * 1000)]))

    def release_lease(self, run_id: str, token: str) -> None:
        self._release(keys=[keys.run_lease(self.ns, run_id)], args=[token])

    # -- events -----------------------------------------------------------------------
    def emit(self, run_id: str, event: dict[str, Any]) -> dict[str, Any]:
        event = {**event, "ts": event.get("ts", time.time())}
        pipe = self.redis.pipeline()
        pipe.xadd(keys.run_events(self.ns, run_id), {"e": json.dumps(event)}, maxlen=_STREAM_MAXLEN,
                  approximate=True)
        pipe.expire(keys.run_events(self.ns, run_id), self.retention_s)
        pipe.execute()
        return event

    def events(self, run_id: str, *, follow: bool = True, timeout_s: float | None = None,
               block_ms: int = 1000) -> Iterator[dict[str, Any]]:
        """Events from the start; with ``follow``, wait for new ones until the run ends."""
        key = keys.run_events(self.ns, run_id)
        last = "0-0"
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            block = block_ms if follow else None
            if deadline is not None and block is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TaskTimeout(f"run {run_id} did not end within {timeout_s} s")
                block = max(1, min(block, int(left * 1000)))
            reply = self.redis.xread({key: last}, count=500, block=block)
            if not reply:
                if not follow:
                    return
                if self.get(run_id).status.terminal and not self.redis.xlen(key):
                    return
                continue
            for _, entries in reply:
                for entry_id, fields in entries:
                    last = _s(entry_id)
                    event: dict[str, Any] = json.loads(fields[b"e"] if b"e" in fields else fields["e"])
                    yield event
                    if event.get("stage") in END_STAGES:
                        return

    def delete(self, run_id: str) -> None:
        session = self.get(run_id).session
        names = list(self.redis.scan_iter(keys.run_pattern(self.ns, run_id)))
        self.redis.delete(keys.run(self.ns, run_id), *names)
        self.redis.zrem(keys.runs(self.ns), run_id)
        if session:
            self.redis.zrem(keys.session_runs(self.ns, session), run_id)


def start_run(app: Any, runs: RunStore, spec: dict[str, Any], *, trainset: Any = None, valset: Any = None,
              queue: str = wire.OPTIMIZE_QUEUE) -> str:
    """Record a run, store its data, and enqueue its first stage. Manual and scheduled runs both start here."""
    run_id = runs.create(spec)
    runs.save_checkpoint(run_id, "input", {"trainset": trainset, "valset": valset})
    runs.emit(run_id, {"stage": Stage.QUEUED.value, "done": 0, "total": None,
                       "message": f"{spec['optimizer']} on {spec['signature']}" + (" (scheduled)" if spec.get("scheduled") else "")})
    send_stage(app, run_id, Stage.LOAD, queue)
    return run_id


def send_stage(app: Any, run_id: str, stage: Stage, queue: str) -> None:
    """Enqueue one stage of a run: ``dspex.optimize.stage``, shown (Celery's ``shadow`` name: Flower's list,
    worker logs) as ``dspex.optimize.<stage>``, with the stage first in its kwargs."""
    app.send_task(wire.STAGE_TASK, kwargs={"stage": stage.value, "run_id": run_id}, queue=queue,
                  shadow=f"{wire.STAGE_TASK.rsplit('.', 1)[0]}.{stage.value}", headers=wire.sent_headers())


class OptimizationRun:
    """A handle on a run: status, events (replayed from the start), cancel, the summary and the candidate."""

    def __init__(self, run_id: str, store: RunStore) -> None:
        self.id = run_id
        self._store = store

    def status(self) -> dict[str, Any]:
        """The run record as JSON: status, stage, scores so far, LM calls, and the summary once done."""
        return self._store.get(self.id).to_json()

    def events(self, *, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """``{"stage", "done", "total", "score"?, "message"?, "ts"}`` dicts; returns once the run ended."""
        return self._store.events(self.id, timeout_s=timeout)

    def candidate(self) -> dict[str, Any]:
        """The compiled candidate's program state (JSON), promoted or not.

        A dry run (no session) promotes nothing; store its candidate with
        ``client.programs.put(session, program, run.candidate())``.

        Raises:
            errors.NotFound: the compile stage has not finished (or the run failed before it).
        """
        return self._store.candidate(self.id)

    def changes(self, *, default_instructions: str | None = None) -> list[dict[str, Any]]:
        """Per predictor, what the run changed: ``{"predictor", "demos": [before, after], "instructions":
        [before, after], "instructions_changed"}``, from the state it started from to its candidate.

        Instructions are None where a state leaves them at the signature's default, unless
        ``default_instructions`` (the published signature's) says what that is.

        Raises:
            errors.NotFound: the compile stage has not finished (or the run failed before it).
        """
        from .compare import predictor_changes

        candidate = self._store.candidate(self.id)
        baseline = (self._store.checkpoint(self.id, "baseline_state") or {}).get("state")
        return [c.to_json() for c in predictor_changes(baseline, candidate, default_instructions=default_instructions)]

    def cancel(self) -> None:
        """Stop at the next stage boundary; the session's program stays untouched."""
        if not self._store.get(self.id).status.terminal:
            self._store.update(self.id, cancel_requested=True)

    def get(self, timeout: float | None = 600.0) -> dict[str, Any]:
        """Wait for the end and return the summary.

        Raises:
            TaskTimeout: the run did not end in time.
            errors.*: the run failed (as its error class) or was cancelled (``errors.Cancelled``).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            rec = self._store.get(self.id)
            if rec.status is RunStatus.SUCCEEDED:
                return dict(rec.summary or {})
            if rec.status is RunStatus.FAILED:
                err = rec.error or {}
                raise from_remote(err.get("type", "DspexError"), err.get("args", ["run failed"]))
            if rec.status is RunStatus.CANCELLED:
                raise Cancelled(f"optimization run {self.id} was cancelled")
            if deadline is not None and time.monotonic() > deadline:
                raise TaskTimeout(f"optimization run {self.id} did not end within {timeout} s ({rec.stage})")
            time.sleep(0.1)

    def __repr__(self) -> str:
        return f"OptimizationRun({self.id!r})"
