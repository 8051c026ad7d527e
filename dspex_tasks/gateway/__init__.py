"""The HTTP gateway: typed routes generated from the published signatures, API keys, live event streams.

``create_gateway`` needs the ``gateway`` extra (FastAPI, uvicorn); ``gateway.auth`` (the key store the CLI
uses) does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_gateway
    from .state import Gateway

__all__ = ["Gateway", "create_gateway"]


def __getattr__(name: str) -> Any:
    if name == "Gateway":
        from .state import Gateway

        return Gateway
    if name == "create_gateway":
        from .app import create_gateway

        return create_gateway
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
