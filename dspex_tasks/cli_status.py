"""``dspex status``: workers, queue depths, program cache counters and sessions, gathered in one place."""

from __future__ import annotations

import contextlib
from typing import Any

from rich.table import Table

from . import keys
from .cli_common import console

__all__ = ["collect_status", "print_status", "queue_depth"]

_CACHE_FIELDS = ("hits", "misses", "evictions", "invalidations", "size")


def queue_depth(redis: Any, queue: str) -> int:
    """Messages waiting in a kombu Redis queue: the list named ``queue`` plus its priority lists."""
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    pipe = redis.pipeline(transaction=False)
    for pri in PRIORITY_STEPS:
        pipe.llen(f"{queue}{Channel.sep}{pri}" if pri else queue)
    return int(sum(pipe.execute()))


def _workers(app: Any, timeout_s: float) -> list[dict[str, Any]]:
    pings = app.control.inspect(timeout=timeout_s).ping() or {}
    stats: dict[str, Any] = {}
    if pings:  # ask only those that answered, and stop waiting once they all did
        stats = app.control.inspect(timeout=timeout_s, destination=list(pings), limit=len(pings)).stats() or {}
    workers = []
    for name in sorted(pings):
        info = stats.get(name) or {}
        pool = info.get("pool") or {}
        workers.append({
            "name": name,
            "ok": pings[name] == {"ok": "pong"},
            "pid": info.get("pid"),
            # "celery.concurrency.thread:TaskPool" -> "thread"
            "pool": str(pool.get("implementation", "")).split(":", 1)[0].rsplit(".", 1)[-1] or None,
            "concurrency": pool.get("max-concurrency"),
            "processed": sum((info.get("total") or {}).values()),
            "uptime_s": info.get("uptime"),
        })
    return workers


def _cache(redis: Any, namespace: str) -> dict[str, Any]:
    totals = dict.fromkeys(_CACHE_FIELDS, 0)
    processes = 0
    for key in redis.scan_iter(match=keys.worker_stats_pattern(namespace), count=500):
        raw = redis.hgetall(key)
        if not raw:
            continue
        processes += 1
        values = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
        for name in _CACHE_FIELDS:
            with contextlib.suppress(TypeError, ValueError):
                totals[name] += int(values.get(name, 0))
    lookups = totals["hits"] + totals["misses"]
    return {**totals, "processes": processes, "hit_rate": round(totals["hits"] / lookups, 4) if lookups else None}


def collect_status(client: Any, *, timeout_s: float = 1.0) -> dict[str, Any]:
    """Everything ``dspex status`` shows, as JSON-ready data."""
    s = client.settings
    redis = client.redis
    return {
        "redis_url": s.redis_url,
        "namespace": s.namespace,
        "workers": _workers(client.app, timeout_s),
        "queues": {q: queue_depth(redis, q) for q in dict.fromkeys([s.predict_queue, s.optimize_queue])},
        "cache": _cache(redis, s.namespace),
        "sessions": int(redis.zcard(keys.sessions(s.namespace))),
        "signatures": sorted(client.signatures(refresh=True)),
    }


def print_status(data: dict[str, Any]) -> None:
    """Render :func:`collect_status` output as rich tables."""
    console.print(f"[bold]Redis[/] {data['redis_url']}  [bold]namespace[/] {data['namespace']}  "
                  f"[bold]sessions[/] {data['sessions']}  [bold]signatures[/] {', '.join(data['signatures']) or '-'}")
    workers = data["workers"]
    if workers:
        table = Table(title=f"workers ({len(workers)})", title_justify="left")
        for col in ("worker", "ping", "pid", "pool", "concurrency", "processed", "uptime"):
            table.add_column(col, justify="left" if col in ("worker", "pool") else "right")
        for w in workers:
            uptime = f"{w['uptime_s']}s" if w["uptime_s"] is not None else "-"
            table.add_row(w["name"], "[green]pong[/]" if w["ok"] else "[red]bad[/]", str(w["pid"] or "-"),
                          w["pool"] or "-", str(w["concurrency"] or "-"), str(w["processed"]), uptime)
        console.print(table)
    else:
        console.print("[yellow]no workers answered a ping[/] (start one: dspex worker)")
    queues = Table(title="queues", title_justify="left")
    queues.add_column("queue")
    queues.add_column("waiting", justify="right")
    for name, depth in data["queues"].items():
        queues.add_row(name, str(depth))
    console.print(queues)
    cache = data["cache"]
    rate = f"{cache['hit_rate']:.1%}" if cache["hit_rate"] is not None else "-"
    console.print(f"[bold]program cache[/] ({cache['processes']} reporting processes): hits {cache['hits']}, "
                  f"misses {cache['misses']}, hit rate {rate}, size {cache['size']}, evictions {cache['evictions']}, "
                  f"invalidations {cache['invalidations']}")
