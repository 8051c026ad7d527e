"""What the routers share: the ``Gateway`` dependency and a JSON response doc (scopes: :mod:`.access`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from ..openapi import ref
from ..state import Gateway

__all__ = ["GatewayDep", "gateway", "json_doc"]


async def gateway(request: Request) -> Gateway:
    """The app's :class:`Gateway` (async: resolved on the event loop, no thread-pool hop)."""
    gw: Gateway = request.app.state.gateway
    return gw


# No parameters of its own, so it adds nothing to the OpenAPI document.
GatewayDep = Annotated[Gateway, Depends(gateway)]


def json_doc(name: str, description: str = "OK") -> dict[int | str, dict[str, Any]]:
    """A 200 response documented as the named component schema."""
    return {200: {"description": description, "content": {"application/json": {"schema": ref(name)}}}}
