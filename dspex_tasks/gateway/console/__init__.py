"""The gateway's web console, served at ``/console`` by ``dspex gateway``: server-rendered pages (Jinja2, htmx,
Chart.js vendored under ``static/``; no build step) over the same Redis state the API serves.

Pages: overview, programs (versions, diff, rollback), optimization runs (live score chart over SSE, cancel), jobs
(a submit form from the signature's input schema, followed live), LM usage, and the fleet. Login is an API key,
exchanged for a signed cookie (:mod:`.auth`); each page and action needs the key's right (read, or write for
rollback, cancel and submit) and its sessions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..state import Gateway

__all__ = ["mount_console"]


def mount_console(app: FastAPI, gw: Gateway) -> None:
    """Mount the console on a gateway app at ``/console``."""
    from ..middleware import CONSOLE_PATH
    from .app import create_console

    app.mount(CONSOLE_PATH, create_console(gw), name="console")
