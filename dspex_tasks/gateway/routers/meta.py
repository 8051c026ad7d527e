"""Liveness: ``/healthz`` (public, no API key); Prometheus metrics: ``/metrics`` (any key with the read right)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..metrics import exposition
from ..models import Health
from .access import ReadKey
from .common import GatewayDep

__all__ = ["router"]

router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["meta"], summary="Liveness and the signature count")
async def healthz(gw: GatewayDep) -> Health:
    return Health(status="ok", signatures=len(gw.signatures))


@router.get("/metrics", tags=["meta"], include_in_schema=False)
async def metrics(access: ReadKey) -> Response:
    """The gateway's Prometheus exposition (requests, durations, in progress, process and GC series)."""
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)
