"""Flower configuration for dspex-tasks: ``celery -A dspex_tasks.worker.celery_app flower --conf=$(python -c "import dspex_tasks.observability.flower_config as f; print(f.__file__)")`` (or ``dspex flower``, which uses this file by default).

Flower 2.x executes this file and takes every top-level name that matches one of its options (``port``,
``basic_auth``, ...) as that option's value, so every helper here starts with an underscore.

Precedence, highest first: Flower's command line (``--port=...``), Flower's own ``FLOWER_*`` environment
variables (``FLOWER_PORT``, ``FLOWER_BASIC_AUTH``, ...; an option given that way is never assigned here),
then the ``DSPEX_FLOWER_*`` variables and defaults below.

==================================  =================================  ==============================
option                              environment                        default
==================================  =================================  ==============================
port                                FLOWER_PORT, DSPEX_FLOWER_PORT     5555
address                             FLOWER_ADDRESS,                    127.0.0.1 (Flower's own
                                    DSPEX_FLOWER_ADDRESS               default '' is every interface)
basic_auth                          FLOWER_BASIC_AUTH                  none: see "Authentication"
persistent                          FLOWER_PERSISTENT                  True
db                                  FLOWER_DB, DSPEX_FLOWER_DB         .dspex/flower.db
state_save_interval (ms)            FLOWER_STATE_SAVE_INTERVAL,        60000
                                    DSPEX_FLOWER_STATE_SAVE_INTERVAL
max_tasks                           FLOWER_MAX_TASKS,                  10000
                                    DSPEX_FLOWER_MAX_TASKS
purge_offline_workers (s)           FLOWER_PURGE_OFFLINE_WORKERS,      600
                                    DSPEX_FLOWER_PURGE_OFFLINE_WORKERS
tasks_columns                       FLOWER_TASKS_COLUMNS,              name,uuid,state,kwargs,result,
                                    DSPEX_FLOWER_TASKS_COLUMNS         received,runtime,worker
task_runtime_metric_buckets (s)     FLOWER_TASK_RUNTIME_METRIC_BUCKETS 0.05 ... 600 (LM calls are slow)
broker_api                          FLOWER_BROKER_API,                 unset: Flower's own guess (below)
                                    DSPEX_FLOWER_BROKER_API
==================================  =================================  ==============================

RabbitMQ broker (``DSPEX_BROKER_URL=amqp://...``): Flower's Broker page and ``/api/queues/length`` read queue
lengths from RabbitMQ's management plugin (``rabbitmq-plugins enable rabbitmq_management``), not over AMQP.
Without ``broker_api`` Flower asks ``http://<broker user>:<password>@<broker host>:15672/api/<vhost>``; set
``DSPEX_FLOWER_BROKER_API=http://user:password@host:15672/api/`` when the management API lives elsewhere.
Without the plugin the page is empty (Flower logs the failed call); tasks, workers and ``/metrics`` work as
with Redis. ``dspex status`` and ``dspex health`` read depths over AMQP and need no plugin. A Redis broker
ignores ``broker_api``.

Authentication: Flower refuses to start (``SystemExit``) unless ``basic_auth`` (``FLOWER_BASIC_AUTH=
user:password[,user2:password2]`` or ``--basic_auth=``) or Flower's OAuth (``FLOWER_AUTH`` with
``FLOWER_AUTH_PROVIDER``) is configured. The one exception is a development instance bound to a loopback
address with ``DSPEX_FLOWER_INSECURE=1`` (the UI is then open to local users; Flower 2 still answers 401 on
``/api/*`` unless ``FLOWER_UNAUTHENTICATED_API=true`` as well). Passwords containing ``,`` cannot be expressed
in ``FLOWER_BASIC_AUTH``.

Prometheus: Flower 2 always serves ``/metrics`` (task events per worker and task name, runtime histograms,
workers online); there is no switch. Note that Flower serves ``/metrics`` and ``/healthcheck`` WITHOUT
authentication even when ``basic_auth`` is set (a scraper needs no credentials); they expose task names,
worker names and counts, not arguments or results. Keep the port off public networks (bind to loopback or a
private interface, or put a proxy in front) if that matters. Everything else, the UI and ``/api/*``
(including task submission and worker control), answers 401 without credentials.

Task arguments: workers send task events (``worker_send_task_events``), so Flower shows each task's kwargs
(``inputs``, ``session``, ``program``) and result, as Celery's 1024-character ``kwargsrepr``/result reprs.
"""

from __future__ import annotations

import ipaddress as _ipaddress
import os as _os
import sys as _sys
from pathlib import Path as _Path

_TRUE = ("1", "true", "yes", "on")


def _flower_env(option: str) -> bool:
    """Whether Flower's own ``FLOWER_<OPTION>`` variable sets ``option`` (then this file leaves it alone)."""
    return f"FLOWER_{option.upper()}" in _os.environ


def _env(name: str, default: str) -> str:
    value = _os.environ.get(name, "").strip()
    return value or default


def _env_int(name: str, default: int) -> int:
    raw = _env(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"flower_config.py: {name}={raw!r} is not an integer") from None


def _argv_options() -> dict[str, str]:
    """``--name=value`` options on Flower's command line (names normalized to ``name_with_underscores``).

    Flower parses its command line again after this file, so a value there wins; the authentication check
    below must look at it too. Flower's arguments follow the ``flower`` sub-command; without one (Flower
    driven some other way) every ``--name=value`` argument counts.
    """
    argv = list(_sys.argv[1:])
    if "flower" in argv:
        argv = argv[argv.index("flower") + 1:]
    found: dict[str, str] = {}
    for arg in argv:
        if arg == "--":
            break
        if not arg.startswith("--"):
            continue
        name, eq, value = arg[2:].partition("=")
        found[name.replace("-", "_")] = value if eq else "true"  # a bare --flag is a boolean option
    return found


def _effective(option: str, ours: str | None) -> str | None:
    """The value Flower will end up with for a string option: command line, then ``FLOWER_*``, then ours."""
    cli = _argv_options()
    if option in cli:
        return cli[option]
    if _flower_env(option):
        return _os.environ[f"FLOWER_{option.upper()}"]
    return ours


def _parse_basic_auth(raw: str, source: str) -> list[str]:
    """``"user:pass,user2:pass2"`` -> ``["user:pass", "user2:pass2"]``; a malformed entry stops Flower."""
    entries = [part.strip() for part in raw.split(",") if part.strip()]
    for i, entry in enumerate(entries, 1):
        user, colon, password = entry.partition(":")
        if not colon or not user or not password:
            raise SystemExit(f"flower_config.py: {source} entry {i} must be 'user:password' "
                             f"(got {user or '<empty>'!r} with {'no' if not colon else 'an empty'} password)")
    return entries


def _is_loopback(address: str) -> bool:
    if address.strip().lower() == "localhost":
        return True
    try:
        return _ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:  # '' (every interface) or a host name
        return False


# -- where to listen -------------------------------------------------------------------------------------------
if not _flower_env("port"):
    port = _env_int("DSPEX_FLOWER_PORT", 5555)
if not _flower_env("address"):
    address = _env("DSPEX_FLOWER_ADDRESS", "127.0.0.1")

# -- authentication --------------------------------------------------------------------------------------------
if _flower_env("basic_auth"):
    # Flower already split FLOWER_BASIC_AUTH on commas; the same list, validated and without stray spaces.
    basic_auth = _parse_basic_auth(_os.environ["FLOWER_BASIC_AUTH"], "FLOWER_BASIC_AUTH")

_cli = _argv_options()
_auth_entries = (_parse_basic_auth(_cli["basic_auth"], "--basic_auth") if "basic_auth" in _cli
                 else list(globals().get("basic_auth") or []))
_oauth = (_effective("auth", None) or "").strip()
_final_address = _effective("address", globals().get("address")) or ""
_unix_socket = (_effective("unix_socket", None) or "").strip()
_insecure = _os.environ.get("DSPEX_FLOWER_INSECURE", "").strip().lower() in _TRUE

if not _auth_entries and not _oauth:
    _local = _unix_socket or _is_loopback(_final_address)
    if not (_local and _insecure):
        _where = f"unix socket {_unix_socket}" if _unix_socket else (
            f"address {_final_address!r}" if _final_address else "every interface (address '')")
        _why = ("DSPEX_FLOWER_INSECURE=1 is only honoured on a loopback address" if _insecure and not _local
                else "for a loopback-only development instance, set DSPEX_FLOWER_INSECURE=1")
        raise SystemExit(
            f"flower_config.py: refusing to start Flower without authentication on {_where}. "
            "Flower can submit tasks and shut workers down: set FLOWER_BASIC_AUTH=user:password[,user2:password2] "
            f"(or Flower's OAuth: FLOWER_AUTH and FLOWER_AUTH_PROVIDER); {_why}.")

# -- state that survives restarts ------------------------------------------------------------------------------
if not _flower_env("persistent"):
    persistent = True
if not _flower_env("db"):
    db = _env("DSPEX_FLOWER_DB", ".dspex/flower.db")
if not _flower_env("state_save_interval"):
    state_save_interval = _env_int("DSPEX_FLOWER_STATE_SAVE_INTERVAL", 60_000)  # milliseconds
_persistent = _effective("persistent", str(globals().get("persistent", False)))
_db_path = _effective("db", globals().get("db"))
if _db_path and (_persistent or "").strip().lower() in (*_TRUE, "t", "y"):  # shelve cannot create the directory
    _Path(_db_path).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)

# -- memory and display ----------------------------------------------------------------------------------------
if not _flower_env("max_tasks"):
    max_tasks = _env_int("DSPEX_FLOWER_MAX_TASKS", 10_000)  # each keeps ~3 KB of kwargs/result reprs
if not _flower_env("purge_offline_workers"):
    purge_offline_workers = _env_int("DSPEX_FLOWER_PURGE_OFFLINE_WORKERS", 600)  # seconds; workers autoscale
if not _flower_env("tasks_columns"):
    tasks_columns = _env("DSPEX_FLOWER_TASKS_COLUMNS", "name,uuid,state,kwargs,result,received,runtime,worker")
if not _flower_env("broker_api") and _env("DSPEX_FLOWER_BROKER_API", ""):
    broker_api = _env("DSPEX_FLOWER_BROKER_API", "")  # RabbitMQ's management API (Flower validates it)
if not _flower_env("task_runtime_metric_buckets"):
    # Prometheus histogram of task runtimes: a prediction waits on an LM, an optimization stage for minutes.
    task_runtime_metric_buckets = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]
