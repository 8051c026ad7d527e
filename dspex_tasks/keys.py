"""Every Redis key and channel the project uses, built in one place.

Session ids sit inside ``{...}`` (a Redis Cluster hash tag, and a delimiter ids
can never contain), so a session's keys share one slot and ``a:b`` + ``c`` can
never collide with ``a`` + ``b:c``.
"""

from __future__ import annotations

import re

from .errors import InvalidId, InvalidSession

_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_ID_TEXT = "1-128 characters of [A-Za-z0-9._:-]"
# Ids of a kind with a known shape get their own pattern: a run id is what RunStore.create generates
# (uuid4().hex), so ``<id>:ckpt:data`` can never name another key of the run.
_KIND: dict[str, tuple[re.Pattern[str], str]] = {
    "run": (re.compile(r"[0-9a-f]{32}"), "32 lowercase hex characters"),
}


def namespace_pattern(ns: str) -> str:
    """Every key of the namespace (for SCAN; the demo cleans up its own with it)."""
    return f"{ns}:*"


def check_id(value: object, what: str = "session") -> str:
    """Return ``value`` if it is a valid id, else raise :class:`~dspex_tasks.errors.InvalidSession` (for a
    session or program id) or :class:`~dspex_tasks.errors.InvalidId` (a run, dataset, schedule, ... id).

    A run id is 32 lowercase hex characters; any other id 1-128 characters of ``[A-Za-z0-9._:-]``."""
    pattern, expected = _KIND.get(what, (_ID, _ID_TEXT))
    if not isinstance(value, str) or not pattern.fullmatch(value):
        shown = repr(value)[:80]
        cls = InvalidSession if what in ("session", "program") else InvalidId
        raise cls(f"invalid {what} id {shown}: expected {expected}")
    return value


def program_meta(ns: str, session: str, program: str) -> str:
    """Hash: current, latest, signature, updated_at of one program."""
    return f"{ns}:{{{session}}}:prog:{program}"


def program_versions(ns: str, session: str, program: str) -> str:
    """Hash: version -> JSON record {state, signature, updated_at}."""
    return f"{ns}:{{{session}}}:prog:{program}:versions"


def program_token(ns: str, session: str, program: str, token: str) -> str:
    """String: the version an idempotent put with this token produced."""
    return f"{ns}:{{{session}}}:prog:{program}:token:{token}"


def session_programs(ns: str, session: str) -> str:
    """Set: program names stored under one session."""
    return f"{ns}:{{{session}}}:programs"


def sessions(ns: str) -> str:
    """Sorted set: session -> last write or use (unix seconds)."""
    return f"{ns}:sessions"


def program_events(ns: str) -> str:
    """Pub/sub channel: program put/rollback/delete notices."""
    return f"{ns}:events:programs"


def signatures(ns: str) -> str:
    """Hash: signature name -> published JSON description."""
    return f"{ns}:signatures"


def signature_events(ns: str) -> str:
    """Pub/sub channel: a worker published signatures."""
    return f"{ns}:events:signatures"


def worker_stats(ns: str, worker: str) -> str:
    """Hash: a worker process's cache counters (expires unless refreshed)."""
    return f"{ns}:workers:{worker}"


def worker_stats_pattern(ns: str) -> str:
    return f"{ns}:workers:*"


def capabilities(ns: str) -> str:
    """Hash: what workers offer besides signatures (metric and optimizer names)."""
    return f"{ns}:capabilities"


def run(ns: str, run_id: str) -> str:
    """Hash: one optimization run's record."""
    return f"{ns}:run:{check_id(run_id, 'run')}"


def run_events(ns: str, run_id: str) -> str:
    """Stream: the run's progress events, replayable from the start."""
    return f"{ns}:run:{check_id(run_id, 'run')}:events"


def run_checkpoint(ns: str, run_id: str, name: str) -> str:
    """String: a stage's stored output (JSON)."""
    return f"{ns}:run:{check_id(run_id, 'run')}:ckpt:{name}"


def run_flag(ns: str, run_id: str, name: str) -> str:
    """String: a once-only marker (next stage enqueued, chord launched)."""
    return f"{ns}:run:{check_id(run_id, 'run')}:flag:{name}"


def run_lease(ns: str, run_id: str) -> str:
    """String: the token of the worker running the run's current stage (expires unless renewed)."""
    return f"{ns}:run:{check_id(run_id, 'run')}:lease"


def run_pattern(ns: str, run_id: str) -> str:
    return f"{ns}:run:{check_id(run_id, 'run')}:*"


def runs(ns: str) -> str:
    """Sorted set: run id -> created (unix seconds)."""
    return f"{ns}:runs"


def session_runs(ns: str, session: str) -> str:
    """Sorted set: a session's run ids -> created."""
    return f"{ns}:{{{session}}}:runs"


def dataset(ns: str, name: str) -> str:
    """String: a named dataset (JSON list of rows)."""
    return f"{ns}:dataset:{name}"


def datasets(ns: str) -> str:
    """Set: dataset names."""
    return f"{ns}:datasets"


def redbeat_prefix(ns: str) -> str:
    """Prefix of RedBeat's schedule keys (RedBeat builds the rest from it)."""
    return f"{ns}:redbeat:"


def deliveries(ns: str, task_id: str) -> str:
    """Counter: how many times a redelivered message has been delivered."""
    return f"{ns}:deliveries:{task_id}"


def job_events(ns: str, job_id: str) -> str:
    """Stream: a ``stream=True`` job's live events (bounded, expiring), replayable from the start."""
    return f"{ns}:job:{check_id(job_id, 'job')}:events"


def job_cancel(ns: str, job_id: str) -> str:
    """String (JSON, expiring): a job's cancellation request, read when it starts and before each LM call."""
    return f"{ns}:job:{check_id(job_id, 'job')}:cancel"


def job_cancels(ns: str) -> str:
    """Sorted set: cancelled job ids -> when their cancel key expires (a worker's local copy loads it)."""
    return f"{ns}:job_cancels"


def job_cancel_events(ns: str) -> str:
    """Pub/sub channel: a job id per cancellation, for the workers' local copies."""
    return f"{ns}:job_cancels:events"


def data_lost(ns: str) -> str:
    """String (JSON, expiring): when a worker found that Redis had restarted without its data."""
    return f"{ns}:data_lost"


def dead_letters(ns: str) -> str:
    """List: messages set aside after too many deliveries, or refused as malformed (newest first)."""
    return f"{ns}:deadletter"


def gateway_api_keys(ns: str) -> str:
    """Hash: sha256 hex of an HTTP gateway API key -> JSON {id, name, created_at, rate_per_min}."""
    return f"{ns}:gateway:apikeys"


def gateway_rate(ns: str, key_id: str) -> str:
    """Hash: one API key's request token bucket {tokens, ts} (expires when idle)."""
    return f"{ns}:gateway:rate:{key_id}"


def gateway_job(ns: str, job_id: str) -> str:
    """String: JSON {signature, key, session, created_at} of a job submitted through the gateway (expires with
    results)."""
    return f"{ns}:gateway:job:{job_id}"


def gateway_jobs(ns: str) -> str:
    """Sorted set: job id -> submitted at (unix seconds) of every job submitted through the gateway, newest
    kept (bounded in size and age like the records; admin's list of recent jobs)."""
    return f"{ns}:gateway:jobs"


def gateway_key_jobs(ns: str, key_id: str) -> str:
    """Sorted set: job id -> submitted at of the jobs one API key submitted (its list of recent jobs), bounded
    as :func:`gateway_jobs`."""
    return f"{ns}:gateway:jobs:key:{key_id}"


# LM control. Rate-limit buckets and the LM cache each share one Redis Cluster slot (their Lua scripts
# touch several keys); the tags contain '#', which no session id can, so they never meet a session's keys.
def ratelimit_bucket(ns: str, scope: str, unit: str) -> str:
    """String: a GCRA bucket's theoretical arrival time in ms (``scope`` e.g. ``model:openai/gpt-4o-mini``)."""
    return f"{ns}:{{#rl}}:{scope}:{unit}"


def ratelimit_reservation(ns: str, task_id: str, call: int) -> str:
    """String: the slot reserved for a task's ``call``-th LM call (in the buckets' hash tag), until it is sent."""
    return ratelimit_bucket(ns, f"task:{task_id}:{call}", "slot")


def lm_cache_entry(ns: str, digest: str) -> str:
    """String: one cached LM response (JSON), expiring after ``DSPEX_LM_CACHE_TTL_S``."""
    return f"{ns}:{{#lmcache}}:e:{digest}"


def lm_cache_index(ns: str) -> str:
    """Sorted set: cache entry key -> stored at (ms); the oldest are evicted past the size bound."""
    return f"{ns}:{{#lmcache}}:index"


def lm_cache_stats(ns: str) -> str:
    """Hash: LM cache counters (hits, misses, stores, evictions)."""
    return f"{ns}:{{#lmcache}}:stats"


def usage(ns: str) -> str:
    """Hash: fleet-wide LM usage, fields ``<signature>|<model>|<metric>`` (tokens, calls, cost_usd, ...)."""
    return f"{ns}:usage"


def session_usage(ns: str, session: str) -> str:
    """Hash: one session's LM usage, same fields as :func:`usage`."""
    return f"{ns}:{{{session}}}:usage"


def usage_hour(ns: str, hour: int) -> str:
    """Hash: fleet-wide LM usage in one UTC hour (``hour`` = unix seconds // 3600), fields as :func:`usage`;
    expires after ``DSPEX_USAGE_HISTORY_DAYS``."""
    return f"{ns}:usage:h:{hour}"


def session_usage_hour(ns: str, session: str, hour: int) -> str:
    """Hash: one session's LM usage in one UTC hour, as :func:`usage_hour`."""
    return f"{ns}:{{{session}}}:usage:h:{hour}"
