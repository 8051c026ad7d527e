"""The HTTP gateway: typed routes generated from the published signatures, API keys, live event streams."""

from __future__ import annotations

from .app import Gateway, create_gateway

__all__ = ["Gateway", "create_gateway"]
