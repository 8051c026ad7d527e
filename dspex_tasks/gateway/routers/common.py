"""What the routers share: the ``Gateway`` dependency, the job lookup, a JSON response doc."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from ...errors import JobNotFound
from ..openapi import ref
from ..problems import Problem
from ..state import Gateway

__all__ = ["GatewayDep", "gateway", "json_doc", "job_or_404"]


async def gateway(request: Request) -> Gateway:
    """The app's :class:`Gateway` (async: resolved on the event loop, no thread-pool hop)."""
    gw: Gateway = request.app.state.gateway
    return gw


# No parameters of its own, so it adds nothing to the OpenAPI document.
GatewayDep = Annotated[Gateway, Depends(gateway)]


async def job_or_404(gw: Gateway, job_id: str) -> dict[str, Any]:
    """A job as the API shows it, or 404 when it is unknown (or its result expired)."""
    record, meta = await gw.jobs.lookup(job_id)
    if record is None and meta is None:
        raise Problem(404, JobNotFound.code, f"no job '{job_id}' (unknown, or its result expired)")
    return gw.job_view(job_id, record, meta)


def json_doc(name: str, description: str = "OK") -> dict[int | str, dict[str, Any]]:
    """A 200 response documented as the named component schema."""
    return {200: {"description": description, "content": {"application/json": {"schema": ref(name)}}}}
