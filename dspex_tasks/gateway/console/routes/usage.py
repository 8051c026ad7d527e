"""``/console/usage``: LM tokens and cost per session, per program (signature) and per model, from the usage
aggregates workers write (:func:`~dspex_tasks.lm.usage.usage_report`), as a chart and tables; and over time, per
UTC hour (:func:`~dspex_tasks.lm.usage.usage_series`), tokens stacked per model or program with the cost.

A key sees the sessions in its scope; the fleet-wide totals (every session and the default program) are admin's.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from ....errors import ValidationError
from ....lm.usage import sum_rows, usage_report, usage_series
from ...routers.common import GatewayDep
from ...scopes import Right
from ..auth import ConsoleUser, need, need_session
from ..data import visible_sessions
from ..render import page

__all__ = ["router"]

router = APIRouter()

#: The time windows the page offers (hours), and how each hour is labelled on the chart.
WINDOWS = {24: "%H:00", 168: "%a %H:00", 720: "%b %d"}
_PALETTE = ("#4c6ef5", "#f59f00", "#37b24d", "#ae3ec9", "#1098ad", "#e8590c", "#868e96", "#d6336c")


def _over_time(series: list[dict[str, Any]], by: str, fmt: str) -> dict[str, Any]:
    """Chart.js data: per hour, tokens of each ``by`` group (stacked bars) and the hour's cost (a line).

    The 30-day window sums hours into days (720 bars would be unreadable at 390 px)."""
    from datetime import UTC, datetime

    per_day = fmt == WINDOWS[720]
    labels: list[str] = []
    tokens: dict[str, list[int]] = defaultdict(list)
    cost: list[float] = []
    for bucket in series:
        label = datetime.fromtimestamp(bucket["hour"], tz=UTC).strftime(fmt)
        if not labels or labels[-1] != label or not per_day:
            labels.append(label)
            cost.append(0.0)
            for values in tokens.values():
                values.append(0)
        for row in bucket["rows"]:
            values = tokens.setdefault(str(row[by]), [0] * len(labels))
            values[-1] += row["total_tokens"]
            cost[-1] += row["cost_usd"]
    datasets = [{"label": name, "data": values, "backgroundColor": _PALETTE[i % len(_PALETTE)]}
                for i, (name, values) in enumerate(sorted(tokens.items()))]
    return {"labels": labels, "datasets": datasets, "cost": [round(c, 8) for c in cost]}


def _total(rows: list[dict[str, Any]], by: str | None = None) -> list[dict[str, Any]]:
    """Rows summed per ``by`` (``signature`` or ``model``), or all together (None)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[str(row[by]) if by else ""].append(row)
    return [{"name": name, **sum_rows(members)} for name, members in sorted(groups.items())]


@router.get("/usage", include_in_schema=False)
def usage_page(request: Request, gw: GatewayDep, user: ConsoleUser) -> Response:
    need(user, Right.READ)
    session = request.query_params.get("session") or None
    redis, ns = gw.client.redis, gw.settings.namespace
    if session is not None:
        need_session(user, session)
    sessions, cut = visible_sessions(gw, user.access)
    per_session = []
    for s in sessions:
        totals = _total(usage_report(redis, ns, s))
        if totals:
            per_session.append({"session": s, **totals[0]})
    fleet = user.access.scopes.admin
    if session is None and not fleet and per_session:  # no fleet view: the first session with usage
        session = per_session[0]["session"]
    rows = usage_report(redis, ns, session) if session is not None or fleet else []
    chart = {"labels": [f"{r['signature']} · {r['model']}" for r in rows],
             "tokens": [r["total_tokens"] for r in rows], "cost": [r["cost_usd"] for r in rows]}
    hours = _choice(request, "hours", {str(h): h for h in WINDOWS}, 24)
    by = _choice(request, "by", {"model": "model", "program": "signature"}, "model")
    over_time = (_over_time(usage_series(redis, ns, session, hours=hours), by, WINDOWS[hours])
                 if session is not None or fleet else None)
    return page(request, "usage.html", active="usage", session=session, fleet=fleet, rows=rows, chart=chart,
                by_program=_total(rows, "signature"), by_model=_total(rows, "model"), per_session=per_session,
                sessions_cut=cut, over_time=over_time, hours=hours, by="program" if by == "signature" else "model",
                windows=WINDOWS)


def _choice(request: Request, name: str, allowed: dict[str, Any], default: Any) -> Any:
    """A query parameter that must be one of ``allowed`` (else a 422 problem naming it and the choices)."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if raw not in allowed:
        raise ValidationError.from_errors("query", [{"field": name, "message": f"expected one of "
                                                      f"{', '.join(allowed)}, got {raw!r}"}])
    return allowed[raw]
