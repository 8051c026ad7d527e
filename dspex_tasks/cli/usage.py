"""``dspex usage``: LM tokens and estimated cost per signature and model, fleet-wide or for one session.

Reads the aggregates workers write (:mod:`dspex_tasks.lm.usage`, flushed every second) and the shared
LM cache's counters (:func:`dspex_tasks.lm.cache.cache_stats`). Costs come from LiteLLM's price table;
a model it does not know is counted at 0 and marked unpriced.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from .common import cli_errors, console, echo_json, esc

__all__ = ["register", "usage", "collect_usage"]


def collect_usage(redis: Any, namespace: str, session: str | None = None) -> dict[str, Any]:
    """``{session, rows, totals, lm_cache}`` as ``dspex usage --json`` prints it."""
    from ..lm.cache import cache_stats
    from ..lm.usage import COST, METRICS, usage_report

    rows = usage_report(redis, namespace, session)
    totals: dict[str, Any] = {**dict.fromkeys(METRICS, 0), COST: 0.0}
    for row in rows:
        for name in (*METRICS, COST):
            totals[name] += row[name]
    totals[COST] = round(float(totals[COST]), 8)
    totals["cost_known"] = totals["unpriced_calls"] == 0
    return {"session": session, "rows": rows, "totals": totals, "lm_cache": cache_stats(redis, namespace)}


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
        data = collect_usage(client, settings.namespace, session)
    finally:
        client.close()
    if as_json:
        echo_json(data)
    else:
        _print(data)


def register(app: typer.Typer) -> None:
    """Add ``dspex usage`` to the root app."""
    app.command("usage")(usage)
