"""``/console/fleet``: workers, queues (depth, oldest message age, consumers), cache hit rates and LM rate-limit
buckets; the page loads its body by htmx (workers are asked by broadcast: about a second) and refreshes it."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from ...routers.common import GatewayDep
from ...scopes import Right
from ..auth import ConsoleUser, need
from ..fleet import fleet
from ..render import fragment, page

__all__ = ["router"]

router = APIRouter()


@router.get("/fleet", include_in_schema=False)
def fleet_page(request: Request, user: ConsoleUser) -> Response:
    need(user, Right.READ)
    return page(request, "fleet.html", active="fleet")


@router.get("/fleet/status", include_in_schema=False)
def fleet_status(request: Request, gw: GatewayDep, user: ConsoleUser) -> Response:
    need(user, Right.READ)
    return fragment(request, "_fleet_status.html", f=fleet(gw))
