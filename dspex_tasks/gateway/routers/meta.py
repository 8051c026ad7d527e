"""Liveness: ``/healthz`` (public, no API key)."""

from __future__ import annotations

from fastapi import APIRouter

from ..models import Health
from .common import GatewayDep

__all__ = ["router"]

router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["meta"], summary="Liveness and the signature count")
async def healthz(gw: GatewayDep) -> Health:
    return Health(status="ok", signatures=len(gw.signatures))
