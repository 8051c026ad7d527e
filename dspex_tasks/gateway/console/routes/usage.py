"""``/console/usage``: LM tokens and cost per session, per program (signature) and per model, from the usage
aggregates workers write (:func:`~dspex_tasks.lm.usage.usage_report`), as a chart and tables.

A key sees the sessions in its scope; the fleet-wide totals (every session and the default program) are admin's.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from ....lm.usage import METRICS, usage_report
from ...routers.common import GatewayDep
from ...scopes import Right
from ..auth import ConsoleUser, need, need_session
from ..data import visible_sessions
from ..render import page

__all__ = ["router"]

router = APIRouter()

_SUMMED = (*METRICS, "cost_usd")


def _total(rows: list[dict[str, Any]], by: str | None = None) -> list[dict[str, Any]]:
    """Rows summed per ``by`` (``signature`` or ``model``), or all together (None)."""
    groups: dict[str, dict[str, Any]] = defaultdict(lambda: dict.fromkeys(_SUMMED, 0))
    for row in rows:
        group = groups[str(row[by]) if by else ""]
        for name in _SUMMED:
            group[name] += row[name]
    return [{"name": name, **values, "cost_usd": round(values["cost_usd"], 8)} for name, values in sorted(groups.items())]


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
    return page(request, "usage.html", active="usage", session=session, fleet=fleet, rows=rows, chart=chart,
                by_program=_total(rows, "signature"), by_model=_total(rows, "model"), per_session=per_session,
                sessions_cut=cut)
