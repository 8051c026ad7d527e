"""Every Redis key and channel the project uses, built in one place.

Session ids sit inside ``{...}`` (a Redis Cluster hash tag, and a delimiter ids
can never contain), so a session's keys share one slot and ``a:b`` + ``c`` can
never collide with ``a`` + ``b:c``.
"""

from __future__ import annotations

import re

from .errors import InvalidSession

_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def namespace_pattern(ns: str) -> str:
    """Every key of the namespace (for SCAN; the demo cleans up its own with it)."""
    return f"{ns}:*"


def check_id(value: object, what: str = "session") -> str:
    """Return ``value`` if it is a valid session/program id, else raise InvalidSession."""
    if not isinstance(value, str) or not _ID.match(value):
        shown = repr(value)[:80]
        raise InvalidSession(f"invalid {what} id {shown}: expected 1-128 characters of [A-Za-z0-9._:-]")
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
    return f"{ns}:run:{run_id}"


def run_events(ns: str, run_id: str) -> str:
    """Stream: the run's progress events, replayable from the start."""
    return f"{ns}:run:{run_id}:events"


def run_checkpoint(ns: str, run_id: str, name: str) -> str:
    """String: a stage's stored output (JSON)."""
    return f"{ns}:run:{run_id}:ckpt:{name}"


def run_flag(ns: str, run_id: str, name: str) -> str:
    """String: a once-only marker (next stage enqueued, chord launched)."""
    return f"{ns}:run:{run_id}:flag:{name}"


def run_lease(ns: str, run_id: str) -> str:
    """String: the token of the worker running the run's current stage (expires unless renewed)."""
    return f"{ns}:run:{run_id}:lease"


def run_pattern(ns: str, run_id: str) -> str:
    return f"{ns}:run:{run_id}:*"


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
