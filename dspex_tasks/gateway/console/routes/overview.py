"""``/console/``: counts of sessions, programs and runs by status, queue depths (refreshed by htmx)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from ...routers.common import GatewayDep
from ...scopes import Right
from ..auth import ConsoleUser, need
from ..data import overview
from ..render import fragment, page

__all__ = ["router"]

router = APIRouter()


@router.get("/", include_in_schema=False)
def overview_page(request: Request, gw: GatewayDep, user: ConsoleUser) -> Response:
    need(user, Right.READ)
    return page(request, "overview.html", active="overview", data=overview(gw, user.access))


@router.get("/overview/counts", include_in_schema=False)
def overview_counts(request: Request, gw: GatewayDep, user: ConsoleUser) -> Response:
    need(user, Right.READ)
    return fragment(request, "_overview_counts.html", data=overview(gw, user.access))
