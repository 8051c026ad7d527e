"""``dspex gateway`` (the HTTP gateway on uvicorn) and ``dspex keys create|ls|revoke`` (its API keys)."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.table import Table

from .common import EXIT_INVALID, cli_errors, console, echo_json, err, esc, fail

__all__ = ["register", "keys_app", "gateway"]

keys_app = typer.Typer(help="API keys of the HTTP gateway: create, ls, revoke.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add ``gateway`` and the ``keys`` group to the root app."""
    app.command()(gateway)
    app.add_typer(keys_app, name="keys")


@cli_errors
def gateway(
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port to bind.")] = 8000,
    workers: Annotated[int, typer.Option("--workers", "-w", min=1, help="uvicorn worker processes.")] = 1,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve without API keys (loopback addresses only; "
                                          "same as DSPEX_GATEWAY_AUTH=off).")] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
) -> None:
    """Serve the HTTP gateway (typed routes per published signature, jobs, programs, runs, live events).

    The OpenAPI document is at /openapi.json, interactive docs at /docs.
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        fail(f"the gateway needs FastAPI and uvicorn ({exc.name} is missing): pip install 'dspex-tasks[gateway]'")
    from ..gateway.middleware import is_loopback
    from ..settings import load_settings

    if no_auth:
        os.environ["DSPEX_GATEWAY_AUTH"] = "off"
    settings = load_settings()
    if not settings.gateway_auth and not is_loopback(host):
        fail(f"authentication is off: refusing to bind {host}; bind a loopback address (127.0.0.1, ::1) or "
             "create keys with 'dspex keys create' and leave DSPEX_GATEWAY_AUTH on", code=EXIT_INVALID)
    from ..worker.startup import RedisUnreachable, preflight

    try:
        preflight(settings, what="gateway")
    except RedisUnreachable as exc:
        fail(str(exc), code=69)
    auth = "API keys required" if settings.gateway_auth else "[yellow]no authentication (loopback only)[/]"
    err.print(f"gateway on [bold]http://{host}:{port}[/] · {auth} · rate {settings.gateway_rate_per_min}/min per key"
              f" · body ≤ {settings.gateway_max_body_bytes} bytes · namespace {settings.namespace}", soft_wrap=True)
    uvicorn.run("dspex_tasks.gateway.app:create_gateway", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, timeout_graceful_shutdown=5, proxy_headers=False)


@contextmanager
def _key_store() -> Iterator[Any]:
    from ..connections import redis_client
    from ..gateway.auth import KeyStore
    from ..settings import load_settings

    settings = load_settings()
    r = redis_client(settings)
    try:
        yield KeyStore(redis=r, namespace=settings.namespace)
    finally:
        r.close()


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


@keys_app.command("create")
@cli_errors
def keys_create(
    name: Annotated[str, typer.Option("--name", "-n", help="Who the key is for (1-64 chars).")],
    rate_per_min: Annotated[int | None, typer.Option("--rate-per-min", min=0, help="This key's request limit "
                                                     "(0 = none).", show_default="DSPEX_GATEWAY_RATE_PER_MIN")] = None,
) -> None:
    """Create an API key. It is printed once, on stdout; only its SHA-256 hash is stored."""
    with _key_store() as store:
        raw, record = store.create(name, rate_per_min=rate_per_min)
    err.print(f"created key [bold]{record.id}[/] for {esc(record.name)}; store it now, it is not shown again")
    typer.echo(raw)


@keys_app.command("ls")
@cli_errors
def keys_ls(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List keys (id, name, created, rate limit); never the keys themselves."""
    with _key_store() as store:
        found = store.list()
    if as_json:
        echo_json([k.to_json() for k in found])
        return
    if not found:
        err.print("no API keys; create one with [bold]dspex keys create --name NAME[/]")
        return
    table = Table("id", "name", "created", "rate/min")
    for k in found:
        rate = "default" if k.rate_per_min is None else str(k.rate_per_min)
        table.add_row(k.id, esc(k.name), _when(k.created_at), rate)
    console.print(table)


@keys_app.command("revoke")
@cli_errors
def keys_revoke(id_or_name: Annotated[str, typer.Argument(help="A key id, or a name (revokes every key with it).")]
                ) -> None:
    """Revoke keys: requests with them are refused at once."""
    with _key_store() as store:
        gone = store.revoke(id_or_name)
    for k in gone:
        err.print(f"revoked {k.id} ({esc(k.name)})")
