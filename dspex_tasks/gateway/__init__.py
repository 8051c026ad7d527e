"""The HTTP gateway: typed routes generated from the published signatures, API keys, live event streams.

``create_gateway`` needs the ``gateway`` extra (FastAPI, uvicorn); ``gateway.auth`` (the key store the CLI
uses) does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import Gateway, create_gateway

__all__ = ["Gateway", "create_gateway"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
