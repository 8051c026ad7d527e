"""Server-side rendering: the Jinja2 environment (autoescaped), the console's security headers, and its filters.

Pages carry a strict Content-Security-Policy: scripts and styles come from ``/console/static`` only (no inline
script, no eval), so data a page's script needs travels in ``data-*`` attributes or a
``<script type="application/json">`` block.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse

__all__ = ["SECURITY_HEADERS", "env", "page", "fragment"]

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

NAV = (("overview", "", "Overview"), ("programs", "/programs", "Programs"), ("runs", "/runs", "Runs"),
       ("jobs", "/jobs", "Jobs"), ("usage", "/usage", "Usage"), ("fleet", "/fleet", "Fleet"))


def _when(ts: Any) -> str:
    """Unix seconds as ``2024-05-01 12:00:03`` UTC ("-" for none)."""
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return "-"
    return dt.datetime.fromtimestamp(float(ts), dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _usd(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"${value:,.6f}"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str, separators=(", ", ": "))


def _tojson(value: Any) -> str:
    """JSON for a ``<script type="application/json">`` block: ``<``, ``>`` and ``&`` escaped, so no ``</script>``
    inside the data ends the block (the result is marked safe: it is not HTML-escaped again)."""
    from markupsafe import Markup

    text = json.dumps(value, default=str).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(text)


env = Environment(loader=PackageLoader("dspex_tasks.gateway.console", "templates"),
                  autoescape=select_autoescape(default=True, default_for_string=True), undefined=StrictUndefined,
                  trim_blocks=True, lstrip_blocks=True)
env.filters.update(when=_when, num=_num, usd=_usd, pretty=_pretty, compact=_compact, tojson=_tojson)
env.globals["nav"] = NAV


def _context(request: Request, values: dict[str, Any]) -> dict[str, Any]:
    return {"request": request, "base": request.scope.get("root_path", ""),
            "user": getattr(request.state, "user", None), "active": "", "flash": request.query_params.get("done"),
            **values}


def page(request: Request, template: str, *, status_code: int = 200, headers: dict[str, str] | None = None,
         **values: Any) -> HTMLResponse:
    """A whole page (the layout, ``base.html``, with ``template``'s blocks)."""
    html = env.get_template(template).render(_context(request, values))
    return HTMLResponse(html, status_code=status_code, headers={**SECURITY_HEADERS, **(headers or {})})


def fragment(request: Request, template: str, **values: Any) -> HTMLResponse:
    """A piece of a page (an htmx swap): the template alone, no layout."""
    return HTMLResponse(env.get_template(template).render(_context(request, values)), headers=SECURITY_HEADERS)
