"""What the console's pages read from Redis, filtered to the logged-in key's scope (synchronous: pages run in
the thread pool).

Listings are bounded: the newest :data:`RUN_SCAN` runs and the first :data:`SESSION_SCAN` sessions (most
recently used first) are read; a page says when it shows a cut.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ... import keys
from ...observability.status import broker_queue_depths
from ...optimize.runs import RunRecord
from ..routers.access import RUN_KEY_FIELD, run_visible
from ..scopes import Access
from ..state import Gateway

__all__ = ["RUN_SCAN", "SESSION_SCAN", "Overview", "overview", "program_rows", "queue_depths", "visible_runs",
           "visible_sessions"]

RUN_SCAN = 2000
SESSION_SCAN = 500
_PAGE = 250


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def visible_sessions(gw: Gateway, access: Access) -> tuple[list[str], bool]:
    """(the sessions the key may read, most recent first, at most SESSION_SCAN; whether more exist)."""
    out: list[str] = []
    start = 0
    while len(out) <= SESSION_SCAN:
        page = [_s(s) for s in gw.client.redis.zrevrange(keys.sessions(gw.settings.namespace), start,
                                                         start + _PAGE - 1)]
        out += [s for s in page if access.scopes.allows(s)]
        if len(page) < _PAGE:
            break
        start += _PAGE
    return out[:SESSION_SCAN], len(out) > SESSION_SCAN


def program_rows(gw: Gateway, sessions: list[str]) -> dict[str, list[tuple[str, int]]]:
    """Per session: (program, current version), by name."""
    r, ns = gw.client.redis, gw.settings.namespace
    pipe = r.pipeline(transaction=False)
    for session in sessions:
        pipe.smembers(keys.session_programs(ns, session))
    names = {s: sorted(_s(p) for p in members) for s, members in zip(sessions, pipe.execute(), strict=True)}
    pipe = r.pipeline(transaction=False)
    for session, programs in names.items():
        for program in programs:
            pipe.hget(keys.program_meta(ns, session, program), "current")
    versions = iter(pipe.execute())
    return {s: [(p, int(next(versions) or 0)) for p in programs] for s, programs in names.items()}


def visible_runs(gw: Gateway, access: Access, *, status: str | None = None, limit: int = 100
                 ) -> tuple[list[RunRecord], Counter[str]]:
    """(the newest ``limit`` visible runs with ``status`` (any: None), the status counts of every visible run
    among the newest RUN_SCAN)."""
    r, ns = gw.client.redis, gw.settings.namespace
    out: list[RunRecord] = []
    counts: Counter[str] = Counter()
    for start in range(0, RUN_SCAN, _PAGE):
        ids = [_s(i) for i in r.zrevrange(keys.runs(ns), start, start + _PAGE - 1)]
        pipe = r.pipeline(transaction=False)
        for run_id in ids:
            pipe.hgetall(keys.run(ns, run_id))
        for raw in pipe.execute():
            if not raw:  # expired
                continue
            rec = RunRecord.from_json({_s(k): json.loads(v) for k, v in raw.items()})
            if not run_visible(access, rec.session or None, rec.extra.get(RUN_KEY_FIELD)):
                continue
            counts[str(rec.status)] += 1
            if (status is None or str(rec.status) == status) and len(out) < limit:
                out.append(rec)
        if len(ids) < _PAGE:
            break
    return out, counts


def queue_depths(gw: Gateway) -> tuple[dict[str, int], str | None]:
    """(messages waiting per queue, or an error line when the broker does not answer)."""
    s = gw.settings
    try:
        return dict(broker_queue_depths(s, redis=gw.client.redis if s.broker == s.redis_url else None)), None
    except Exception as exc:  # a RabbitMQ broker that is down: the page says so, and renders the rest
        return {}, f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Overview:
    sessions: int
    sessions_cut: bool
    programs: int
    runs: dict[str, int]
    queues: dict[str, int]
    queue_error: str | None
    signatures: int


def overview(gw: Gateway, access: Access) -> Overview:
    sessions, cut = visible_sessions(gw, access)
    rows = program_rows(gw, sessions)
    _, counts = visible_runs(gw, access, limit=0)
    depths, error = queue_depths(gw)
    return Overview(len(sessions), cut, sum(len(p) for p in rows.values()), dict(sorted(counts.items())), depths,
                    error, len(gw.signatures))
