"""``dspex usage``: LM tokens and estimated cost per signature and model, fleet-wide or for one session.

Reads the aggregates workers write (:mod:`dspex_tasks.lm.usage`, flushed every second) and the shared
LM cache's counters (:func:`dspex_tasks.lm.cache.cache_stats`). Costs come from LiteLLM's price table;
a model it does not know is counted at 0 and marked unpriced.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from .common import cli_errors, console, echo_json, esc

__all__ = ["register", "usage", "collect_usage", "hourly"]


def hourly(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per hour of :func:`~dspex_tasks.lm.usage.usage_series`: its start (ISO, UTC) and totals, and per model."""
    from ..lm.usage import COST, sum_rows

    out = []
    for bucket in series:
        per_model: dict[str, dict[str, Any]] = {}
        for row in bucket["rows"]:
            model = per_model.setdefault(row["model"], {"lm_calls": 0, "total_tokens": 0, COST: 0.0})
            for name in model:
                model[name] += row[name]
        hour = datetime.fromtimestamp(bucket["hour"], tz=UTC).strftime("%Y-%m-%dT%H:00Z")
        out.append({"hour": hour, **sum_rows(bucket["rows"]),
                    "models": {m: {**v, COST: round(v[COST], 8)} for m, v in sorted(per_model.items())}})
    return out


def collect_usage(redis: Any, namespace: str, session: str | None = None, hours: int | None = None) -> dict[str, Any]:
    """``{session, rows, totals, lm_cache}`` (and ``hourly`` for the last ``hours``) as ``dspex usage --json``
    prints it."""
    from ..lm.cache import cache_stats
    from ..lm.usage import sum_rows, usage_report, usage_series

    rows = usage_report(redis, namespace, session)
    data = {"session": session, "rows": rows, "totals": sum_rows(rows), "lm_cache": cache_stats(redis, namespace)}
    if hours:
        data["hourly"] = hourly(usage_series(redis, namespace, session, hours=hours))
    return data


def _print_hourly(data: dict[str, Any]) -> None:
    table = Table(title=f"LM usage per hour (UTC, last {len(data['hourly'])})", title_justify="left")
    table.add_column("hour", no_wrap=True)
    for column in ("tasks", "LM calls", "tokens", "cost (USD)"):
        table.add_column(column, justify="right")
    table.add_column("models", overflow="fold")  # whole model names, wrapped, never cut to "openai/m…"
    for h in data["hourly"]:
        table.add_row(h["hour"].replace("T", " "), str(h["tasks"]), str(h["lm_calls"]), str(h["total_tokens"]),
                      f"{h['cost_usd']:.6f}", esc(", ".join(h["models"])) or "[dim]-[/]")
    console.print(table)


def _print(data: dict[str, Any]) -> None:
    scope = f"session {esc(data['session'])}" if data["session"] else "all sessions"
    table = Table(title=f"LM usage ({scope})", title_justify="left")
    for column in ("signature", "model", "tasks", "LM calls", "cache hits", "prompt tok", "completion tok",
                   "total tok", "cost (USD)"):
        table.add_column(column, justify="left" if column in ("signature", "model") else "right")

    def cost(row: dict[str, Any]) -> str:
        text = f"{row['cost_usd']:.6f}"
        return text if row["cost_known"] else f"{text} [dim](unpriced: {row['unpriced_calls']})[/]"

    for row in data["rows"]:
        table.add_row(esc(row["signature"]), esc(row["model"]), str(row["tasks"]), str(row["lm_calls"]),
                      str(row["cache_hits"]), str(row["prompt_tokens"]), str(row["completion_tokens"]),
                      str(row["total_tokens"]), cost(row))
    t = data["totals"]
    if data["rows"]:
        table.add_section()
        table.add_row("[bold]total[/]", "", str(t["tasks"]), str(t["lm_calls"]), str(t["cache_hits"]),
                      str(t["prompt_tokens"]), str(t["completion_tokens"]), str(t["total_tokens"]), cost(t))
    console.print(table)
    if not data["rows"]:
        console.print("[dim]no LM usage recorded yet[/]")
    c = data["lm_cache"]
    lookups = c["hits"] + c["misses"]
    rate = f"{100.0 * c['hits'] / lookups:.1f}%" if lookups else "-"
    console.print(f"shared LM cache: {c['hits']} hits, {c['misses']} misses (hit rate {rate}), "
                  f"{c['entries']} entries, {c['evictions']} evicted")
    if t["unpriced_calls"]:
        console.print("[dim]unpriced: calls to models LiteLLM's price table does not know (counted at 0 USD)[/]")


@cli_errors
def usage(
    session: Annotated[str | None, typer.Option("--session", "-s", help="Only this session.")] = None,
    hours: Annotated[int | None, typer.Option("--hours", min=1, max=24 * 400,
                                              help="Also show each of the last N hours (UTC).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """LM tokens and estimated cost per signature and model (fleet-wide, or one session)."""
    from .. import keys
    from ..connections import redis_client
    from ..settings import load_settings

    settings = load_settings()
    if session is not None:
        keys.check_id(session, "session")
    client = redis_client(settings)
    try:
        data = collect_usage(client, settings.namespace, session, hours)
    finally:
        client.close()
    if as_json:
        echo_json(data)
    else:
        _print(data)
        if hours:
            _print_hourly(data)


def register(app: typer.Typer) -> None:
    """Add ``dspex usage`` to the root app."""
    app.command("usage")(usage)
