"""``dspex status``: renders :func:`dspex_tasks.observability.status.collect_status` as rich tables."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ..observability.status import unconsumed_message
from .common import console, esc

__all__ = ["print_status"]


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
    queues.add_column("consumers", overflow="fold")
    consumers = data.get("consumers") or {}
    for name, depth in data["queues"].items():
        who = consumers.get(name) or []
        queues.add_row(name, "-" if depth is None else str(depth),
                       ", ".join(who) if who else ("[red]none[/]" if depth else "[yellow]none[/]"))
    console.print(queues)
    if data.get("unconsumed"):
        console.print(f"[bold red]stuck:[/] {esc(unconsumed_message(data['unconsumed']))}", soft_wrap=True)
    cache = data["cache"]
    rate = f"{cache['hit_rate']:.1%}" if cache["hit_rate"] is not None else "-"
    console.print(f"[bold]program cache[/] ({cache['processes']} reporting processes): hits {cache['hits']}, "
                  f"misses {cache['misses']}, hit rate {rate}, size {cache['size']}, evictions {cache['evictions']}, "
                  f"invalidations {cache['invalidations']}")
    _print_metrics(data.get("metrics") or {})


def _print_metrics(metrics: dict[str, Any]) -> None:
    tasks = metrics.get("tasks") or {}
    endpoints = metrics.get("endpoints") or []
    console.print(f"[bold]/metrics[/] {', '.join(endpoints) if endpoints else 'not served (set DSPEX_METRICS_PORT)'}")
    if not tasks:
        console.print("[bold]tasks[/]: none recorded by the live worker processes yet")
        return
    outcomes = ("success", "failure", "retry")
    table = Table(title=f"tasks ({metrics.get('processes', 0)} processes)", title_justify="left")
    table.add_column("signature")
    for col in outcomes:
        table.add_column(col, justify="right")
    for sig, counts in tasks.items():
        table.add_row(sig, *(str(counts.get(o, 0)) for o in outcomes))
    total = metrics.get("tasks_total") or {}
    table.add_row("[bold]all[/]", *(f"[bold]{total.get(o, 0)}[/]" for o in outcomes))
    console.print(table)
    for model, u in (metrics.get("lm") or {}).items():
        console.print(f"[bold]LM[/] {model}: {u['calls']:.0f} calls, {u['prompt_tokens']:.0f} prompt + "
                      f"{u['completion_tokens']:.0f} completion tokens, est. ${u['cost_usd']:.4f}")
    runs = metrics.get("optimization_runs") or {}
    if runs:
        shown = "; ".join(f"{opt} " + ", ".join(f"{o} {n}" for o, n in counts.items()) for opt, counts in runs.items())
        promoted = sum((metrics.get("promotions") or {}).values())
        console.print(f"[bold]optimization runs[/]: {shown}; promotions {promoted}")
