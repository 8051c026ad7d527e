"""``dspex flower`` and ``dspex health``: run the monitoring UI and probe a deployment.

``dspex health`` is meant for liveness/readiness probes and cron checks: exit 0 healthy, 1 unhealthy (stderr
names the failed checks), 2 bad usage. Celery and redis are imported inside the commands, so ``dspex --help``
stays fast.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..observability.status import oldest_message_age, oldest_queue_age, queue_depth, unconsumed_message
from .common import EXIT_INVALID, cli_errors, console, echo_json, err, esc, fail, redacted_url

__all__ = ["register", "flower", "health", "collect_health", "flower_argv", "default_flower_conf",
           "oldest_message_age", "is_local_worker"]

#: The Celery app Flower and workers load by default.
DEFAULT_APP = "dspex_tasks.worker.celery_app"



def register(app: typer.Typer) -> None:
    """Add ``flower`` and ``health`` to the root app."""
    app.command(context_settings={"allow_extra_args": True})(flower)  # Flower options after --
    app.command()(health)


# -- dspex flower ------------------------------------------------------------------------------------------------

def default_flower_conf() -> Path:
    """The packaged ``dspex_tasks/observability/flower_config.py`` (a checkout's root ``flower_config.py`` runs
    the same file)."""
    return Path(__file__).resolve().parents[1] / "observability" / "flower_config.py"


def flower_argv(conf: Path, *, port: int | None = None, address: str | None = None, celery_app: str = DEFAULT_APP,
                extra: list[str] | None = None) -> list[str]:
    """The command line ``dspex flower`` runs (explicit ``--port``/``--address`` win over any environment)."""
    argv = [sys.executable, "-m", "celery", "-A", celery_app, "flower", f"--conf={conf.resolve()}"]
    if port is not None:
        argv.append(f"--port={port}")
    if address is not None:
        argv.append(f"--address={address}")
    return argv + list(extra or [])


@cli_errors
def flower(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="TCP port (0 picks a free one).",
                                             show_default="FLOWER_PORT, DSPEX_FLOWER_PORT or 5555")] = None,
    address: Annotated[str | None, typer.Option(help="Interface to bind.",
                                                show_default="FLOWER_ADDRESS, DSPEX_FLOWER_ADDRESS or "
                                                             "127.0.0.1")] = None,
    conf: Annotated[Path | None, typer.Option(help="Flower configuration file.",
                                              show_default="the packaged flower_config.py")] = None,
    celery_app: Annotated[str, typer.Option("--app", "-A", help="Celery app module.")] = DEFAULT_APP,
) -> None:
    """Run Flower (the Celery monitoring UI and API) with flower_config.py: auth on, state kept, /metrics.

    Authentication is required: set FLOWER_BASIC_AUTH=user:password (Flower refuses to start otherwise,
    except on a loopback address with DSPEX_FLOWER_INSECURE=1). Further Flower options pass through,
    e.g. dspex flower -- --url_prefix=flower.
    """
    path = conf or default_flower_conf()
    if not path.is_file():
        fail(f"no Flower configuration at {path}; pass --conf PATH", code=EXIT_INVALID)
    extra = [arg for arg in ctx.args if arg != "--"]
    argv = flower_argv(path, port=port, address=address, celery_app=celery_app, extra=extra)
    err.print(f"[dim]exec {esc(' '.join(argv[1:]))}[/]", soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        # Replace this process: signals (Ctrl-C, SIGTERM from a supervisor) reach Flower itself.
        os.execv(sys.executable, argv)
    raise typer.Exit(subprocess.call(argv))  # pragma: no cover - no exec on this platform


# -- dspex health ------------------------------------------------------------------------------------------------

def is_local_worker(name: str, hostname: str | None = None) -> bool:
    """Whether the node ``name`` (``dspex1@host``) runs on this host (full or short host name)."""
    host = hostname or socket.gethostname()
    node_host = name.rpartition("@")[2]
    return bool(node_host) and "@" in name and node_host in {host, host.split(".", 1)[0]}


def _queue_info(redis: Any, queue: str, max_age_s: float) -> dict[str, Any]:
    depth = queue_depth(redis, queue)
    age, source = oldest_queue_age(redis, queue) if depth else (None, None)
    return {"depth": depth, "oldest_age_s": None if age is None else round(age, 3), "age_source": source,
            "ok": age is None or age <= max_age_s}


def _is_redis_url(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://"))


def _check_broker(url: str, timeout_s: float) -> tuple[dict[str, Any], Any]:
    """PING the broker; returns the check and, when it answered, the open connection (redis-py or kombu).

    For RabbitMQ, opening the connection (AMQP handshake, login, vhost) is the ping.
    """
    t0 = time.monotonic()
    check: dict[str, Any] = {"ok": False, "url": redacted_url(url), "latency_ms": None, "error": None,
                             "kind": "redis" if _is_redis_url(url) else "rabbitmq"}
    conn: Any = None
    try:
        if _is_redis_url(url):
            from ..connections import probe_client

            conn = probe_client(url, timeout_s)
            check["ok"] = bool(conn.ping())
        else:
            from ..connections import amqp_connection

            conn = amqp_connection(url, timeout_s)
            conn.ensure_connection(max_retries=0, timeout=timeout_s)
            check["ok"] = True
    except Exception as exc:
        if conn is not None:
            conn.close()
        check["error"] = f"{type(exc).__name__}: {exc}"
        return check, None
    check["latency_ms"] = round((time.monotonic() - t0) * 1000, 2)
    return check, conn


def _queue_infos(conn: Any, settings: Any, max_age_s: float) -> dict[str, dict[str, Any]]:
    """Depth (and, on Redis, the oldest stamped message's age) of every queue, on the open broker connection."""
    if _is_redis_url(settings.broker):
        return {q: _queue_info(conn, q, max_age_s) for q in settings.queues}
    from ..observability.status import amqp_queue_depths

    return {q: {"depth": depth, "oldest_age_s": None, "age_source": None, "ok": True}
            for q, depth in amqp_queue_depths(conn, settings.queues).items()}


def _check_workers(settings: Any, timeout_s: float, local: bool) -> dict[str, Any]:
    from ..app import create_app

    app = create_app(settings)
    try:
        # Pings are broadcast and nobody knows how many workers will answer: any worker will do, so stop at the
        # first reply; only workers of this host will do with --local, so wait out the timeout and filter.
        replies = app.control.inspect(timeout=timeout_s, limit=None if local else 1).ping() or {}
    except Exception as exc:  # the broker went away between the checks, or refused the broadcast
        return {"ok": False, "answered": [], "counted": [], "local": local, "timeout_s": timeout_s,
                "error": f"ping failed: {type(exc).__name__}: {exc}"}
    finally:
        app.close()
    names = sorted(replies)
    host = socket.gethostname()
    counted = [n for n in names if is_local_worker(n, host)] if local else names
    check: dict[str, Any] = {"ok": bool(counted), "answered": names, "counted": counted, "local": local,
                             "timeout_s": timeout_s}
    if local:
        check["hostname"] = host
    if not counted:
        where = f" on this host ({host})" if local else ""
        check["error"] = f"no worker answered a ping within {timeout_s:g} s{where}"
        if local and names:
            check["error"] += f"; others did: {', '.join(names)}"
    return check


def _check_registry(settings: Any, timeout_s: float, local: bool = False) -> dict[str, Any]:
    """Signatures published by workers: none means clients answer ``UnknownSignature`` to every submit.

    Also fails (except with ``--local``, a probe that must not restart workers for it) for a while after a
    worker found that Redis had restarted without its data: queued tasks and results vanished with it.
    """
    from .. import keys
    from ..connections import probe_client

    conn = probe_client(settings.redis_url, timeout_s)
    try:
        count = int(conn.hlen(keys.signatures(settings.namespace)))
        lost_raw = conn.get(keys.data_lost(settings.namespace))
    except Exception as exc:
        return {"ok": False, "signatures": None, "error": f"could not read the registry: {type(exc).__name__}: {exc}"}
    finally:
        conn.close()
    check: dict[str, Any] = {"ok": count > 0, "signatures": count}
    if not count:
        check["error"] = (f"no signature published in namespace '{settings.namespace}': start a worker, or Redis "
                          "may have lost its data (restarted without persistence); running workers republish "
                          "within seconds")
    elif lost_raw is not None:
        lost = json.loads(lost_raw)
        check["data_lost"] = lost
        if not local:
            ago = max(0.0, time.time() - float(lost.get("at", 0)))
            check["ok"] = False
            check["error"] = (f"Redis lost its data {ago:.0f} s ago (restarted without persistence; noticed by "
                              f"worker {lost.get('worker')}): tasks queued or running then, and stored results, "
                              "are gone (waiting clients get ResultLost); turn on persistence (appendonly yes). "
                              "This check clears 10 minutes after the loss")
    return check


def _stuck_queues(settings: Any, queues: dict[str, Any], timeout_s: float) -> dict[str, int]:
    """Queues with messages and no live consumer (asked only when some queue has messages: a broadcast waits)."""
    depths = {q: info["depth"] for q, info in queues.items()}
    if not any(depths.values()):
        return {}
    from ..app import create_app
    from ..observability.status import queue_consumers, unconsumed

    app = create_app(settings)
    try:
        return unconsumed(depths, queue_consumers(app, timeout_s))
    except Exception:  # the broadcast failed: the worker check already says why
        return {}
    finally:
        app.close()


def collect_health(settings: Any, *, max_queue_age_s: float = 300.0, timeout_s: float = 2.0,
                   local: bool = False) -> dict[str, Any]:
    """Every check ``dspex health`` runs, as JSON-ready data (``healthy``, ``failed`` and one entry per check)."""
    broker, conn = _check_broker(settings.broker, timeout_s)
    skipped = {"ok": False, "skipped": True, "error": "skipped: the broker did not answer"}
    workers = _check_workers(settings, timeout_s, local) if broker["ok"] else dict(skipped)
    if conn is not None:
        try:
            queues = _queue_infos(conn, settings, max_queue_age_s)
        finally:
            conn.close()
        old = [f"{q} {info['oldest_age_s']:g} s" for q, info in queues.items() if not info["ok"]]
        stuck = _stuck_queues(settings, queues, timeout_s) if workers["ok"] else {}
        queue_check: dict[str, Any] = {"ok": not old and not stuck, "max_age_s": max_queue_age_s, "queues": queues,
                                       "unconsumed": stuck}
        problems = [f"oldest message older than {max_queue_age_s:g} s: {', '.join(old)}"] if old else []
        if stuck:
            problems.append(unconsumed_message(stuck))
        if problems:
            queue_check["error"] = "; ".join(problems)
    else:
        queue_check = dict(skipped)
    registry = _check_registry(settings, timeout_s, local) if broker["ok"] else dict(skipped)
    checks = {"broker": broker, "workers": workers, "queues": queue_check, "registry": registry}
    # A check skipped because the broker is down is not a failure of its own.
    failed = [name for name, check in checks.items() if not check["ok"] and not check.get("skipped")]
    healthy = all(check["ok"] for check in checks.values())
    return {"healthy": healthy, "failed": failed, "namespace": settings.namespace, **checks}


def _queue_detail(queues: dict[str, Any]) -> str:
    parts = []
    for name, info in queues.items():
        age = "age unknown" if info["oldest_age_s"] is None else f"oldest {info['oldest_age_s']:g} s"
        parts.append(f"{name}: {info['depth']} waiting, {age}" if info["depth"] else f"{name}: empty")
    return "; ".join(parts) or "-"


def _print_health(data: dict[str, Any]) -> None:
    table = Table(title=f"health ({data['namespace']})", title_justify="left")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    broker = data["broker"]
    workers = data["workers"]
    queues = data["queues"]
    queue_detail = queues.get("note") or _queue_detail(queues.get("queues") or {})
    if queues.get("error"):
        queue_detail = f"{queues['error']} ({queue_detail})" if queues.get("queues") else queues["error"]
    rows = [
        ("broker", broker, f"{broker['url']} ({broker['latency_ms']} ms)" if broker["ok"] else broker["error"]),
        ("workers", workers, (f"{len(workers['counted'])} answered" + (" on this host" if workers["local"] else "")
                              + f": {', '.join(workers['counted'])}") if workers["ok"] else workers["error"]),
        ("queues", queues, queue_detail),
        ("registry", data["registry"], f"{data['registry'].get('signatures')} signatures published"
         if data["registry"]["ok"] else data["registry"]["error"]),
    ]
    for name, check, detail in rows:
        status = "[yellow]skipped[/]" if check.get("skipped") and not check["ok"] else (
            "[green]ok[/]" if check["ok"] else "[red]FAIL[/]")
        table.add_row(name, status, esc(detail))
    console.print(table)


@cli_errors
def health(
    max_queue_age_s: Annotated[float, typer.Option("--max-queue-age-s", min=0, help="Fail when the oldest "
                                                   "waiting message with a known send time is older.")] = 300.0,
    timeout: Annotated[float, typer.Option(min=0.05, help="Seconds to wait for the broker and for worker "
                                           "pings.")] = 2.0,
    local: Annotated[bool, typer.Option("--local", help="Require a worker on this host (node name ending in "
                                        "@<hostname>).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False,
) -> None:
    """Probe the deployment: broker PING, a worker answering, queue age, signatures published. Exit 0 healthy, 1 not.

    Celery messages carry no send time by default, so a queue's age is known only when producers stamp a
    dspex_sent_at header (or a message's ETA has passed); otherwise the depth is shown and the age passes.
    On RabbitMQ only the depth is read (peeking at a message would mark it redelivered).
    """
    from ..settings import load_settings

    data = collect_health(load_settings(), max_queue_age_s=max_queue_age_s, timeout_s=timeout, local=local)
    if as_json:
        echo_json(data)
    else:
        _print_health(data)
    if not data["healthy"]:
        reasons = "; ".join(f"{name}: {data[name].get('error') or 'failed'}" for name in data["failed"])
        err.print(f"[bold red]unhealthy[/] ({esc(reasons)})")
        raise typer.Exit(1)
