"""``dspex gateway`` (the HTTP gateway on uvicorn) and ``dspex keys create|ls|grant|revoke`` (its API keys).

A key's scopes (:mod:`dspex_tasks.gateway.scopes`): ``--rights`` (read, write, admin) and ``--sessions``
(``team-a``, ``team-a*``, ``*``, ``@default``). A new key gets ``read,write`` on ``@default`` (the default
program only) unless told otherwise; ``grant`` adds to an existing key.
"""

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

keys_app = typer.Typer(help="API keys of the HTTP gateway: create, ls, grant, revoke.", no_args_is_help=True)

_SESSIONS_HELP = ("Sessions the key may use, comma-separated or repeated: an id (team-a), a prefix ending in '*' "
                  "(team-a* matches team-a:1, team-ab), '*' (every session) or '@default' (the default program, "
                  "no session).")
_RIGHTS_HELP = ("Rights, comma-separated or repeated: read (its jobs; programs, runs of its sessions), write "
                "(submit and cancel jobs, put programs, start/cancel runs), admin (everything, every session, "
                "deletes).")


def register(app: typer.Typer) -> None:
    """Add ``gateway`` and the ``keys`` group to the root app."""
    app.command()(gateway)
    app.add_typer(keys_app, name="keys")


@cli_errors
def gateway(
    host: Annotated[str, typer.Option("--host", envvar="DSPEX_GATEWAY_HOST", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", envvar="DSPEX_GATEWAY_PORT", min=0, max=65535,
                                      help="Port to bind.")] = 8000,
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


def _scope_line(key: Any) -> str:
    rights, sessions = key.scopes.describe()
    return f"rights {rights}; sessions {sessions}"


@keys_app.command("create")
@cli_errors
def keys_create(
    name: Annotated[str, typer.Option("--name", "-n", help="Who the key is for (1-64 chars).")],
    rate_per_min: Annotated[int | None, typer.Option("--rate-per-min", min=0, help="This key's request limit "
                                                     "(0 = none).", show_default="DSPEX_GATEWAY_RATE_PER_MIN")] = None,
    sessions: Annotated[list[str] | None, typer.Option("--sessions", "-s", help=_SESSIONS_HELP,
                                                       show_default="@default")] = None,
    rights: Annotated[list[str] | None, typer.Option("--rights", "-r", help=_RIGHTS_HELP,
                                                     show_default="read,write")] = None,
) -> None:
    """Create an API key. It is printed once, on stdout; only its SHA-256 hash is stored.

    Least privilege by default: read and write on the default program only; name its sessions with --sessions.
    """
    with _key_store() as store:
        raw, record = store.create(name, rate_per_min=rate_per_min, sessions=sessions, rights=rights)
    err.print(f"created key [bold]{record.id}[/] for {esc(record.name)} ({esc(_scope_line(record))}); store it "
              "now, it is not shown again", soft_wrap=True)
    typer.echo(raw)


@keys_app.command("grant")
@cli_errors
def keys_grant(
    id_or_name: Annotated[str, typer.Argument(help="A key id, or a name only one key has.")],
    sessions: Annotated[list[str] | None, typer.Option("--sessions", "-s", help=_SESSIONS_HELP)] = None,
    rights: Annotated[list[str] | None, typer.Option("--rights", "-r", help=_RIGHTS_HELP)] = None,
) -> None:
    """Add sessions and rights to a key (from its next request on). To take some away, create a new key and
    revoke this one."""
    with _key_store() as store:
        key = store.grant(id_or_name, sessions=sessions or (), rights=rights or ())
    err.print(f"key [bold]{key.id}[/] ({esc(key.name)}) now has {esc(_scope_line(key))}", soft_wrap=True)


@keys_app.command("ls")
@keys_app.command("list", hidden=True)
@cli_errors
def keys_ls(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List keys (id, name, created, rate limit, rights, sessions); never the keys themselves.

    A key stored before scopes existed is marked legacy: it keeps full access until replaced by a scoped key.
    """
    with _key_store() as store:
        found = store.list()
    if as_json:
        echo_json([k.to_json() for k in found])
        return
    if not found:
        err.print("no API keys; create one with [bold]dspex keys create --name NAME[/]")
        return
    table = Table()
    for column in ("id", "name", "created", "rate/min"):  # kept whole; the scopes wrap when the terminal is narrow
        table.add_column(column, no_wrap=True)
    table.add_column("rights")
    table.add_column("sessions", overflow="fold")
    for k in found:
        rate = "default" if k.rate_per_min is None else str(k.rate_per_min)
        rights, scope = k.scopes.describe()
        table.add_row(k.id, esc(k.name), _when(k.created_at), rate, esc(rights), esc(scope))
    console.print(table)
    legacy = [k.id for k in found if k.legacy]
    if legacy:
        err.print(f"[yellow]{len(legacy)} legacy key(s)[/] (stored before scopes) keep full access: replace each "
                  "with [bold]dspex keys create --name NAME --sessions ... --rights ...[/] and revoke it",
                  soft_wrap=True)


@keys_app.command("revoke")
@cli_errors
def keys_revoke(id_or_name: Annotated[str, typer.Argument(help="A key id, or a name (revokes every key with it).")]
                ) -> None:
    """Revoke keys: requests with them are refused at once."""
    with _key_store() as store:
        gone = store.revoke(id_or_name)
    for k in gone:
        err.print(f"revoked {k.id} ({esc(k.name)})")
