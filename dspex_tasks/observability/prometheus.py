"""Prometheus metrics of worker processes, collected from Celery signals.

Task code stays clean: ``task_prerun``/``task_postrun`` (one handler per signal, connected once per
process by :func:`install`) see every task's name, kwargs, final state and return value, which carries
``usage`` and ``lm``. ``task_postrun`` fires exactly once per execution with the final state
(SUCCESS, FAILURE or RETRY), so it alone counts outcomes; ``task_failure``/``task_retry`` would count
the same executions twice.

Exposure: with ``DSPEX_METRICS_PORT`` set, each worker process serves ``/metrics`` (started from
``worker_init``) on ``DSPEX_METRICS_HOST`` (default ``127.0.0.1``; ``0.0.0.0`` where Prometheus scrapes from
another host or pod, as deploy/ sets it). ``DSPEX_METRICS_PORT=0`` takes a free port; a port in use moves on to the next free
one (up to +63), so ``dspex worker --processes 4`` with ``DSPEX_METRICS_PORT=9100`` serves 9100-9103.
Each process records its bound port in its Redis stats hash (``dspex status`` lists the endpoints).

Prefork pool: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory (before the worker starts; wiped
between runs) and the main process serves the sum over its pool children
(``prometheus_client.multiprocess.MultiProcessCollector``). Without it each child serves its own port.

Besides the Prometheus registry, the same counters are mirrored in plain dicts; the runtime's periodic
``flush()`` writes them into Redis (:func:`snapshot_json`) for ``dspex status``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from ..lm.usage import price
from ..wire import MAP_TASK, program_of

__all__ = [
    "DURATION_BUCKETS", "REGISTRY", "add_runtime_collectors", "estimate_cost", "install", "multiprocess_mode",
    "on_task_postrun", "prime_series",
    "on_task_prerun", "record_promotion", "record_result", "record_run", "record_task", "reset_snapshot",
    "served_port", "signature_of", "snapshot", "snapshot_json", "start_server", "stop_server", "sync_cache",
]

log = logging.getLogger(__name__)

#: LLM calls take from milliseconds (a cache or the mock) to minutes (long generations).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

_OUTCOMES = {"SUCCESS": "success", "FAILURE": "failure", "RETRY": "retry"}
PORT_SCAN = 64

#: This process's registry (served as is unless in multiprocess mode), with the standard ``process_*``,
#: ``python_gc_*`` and ``python_info`` series beside dspex's own.
REGISTRY = CollectorRegistry(auto_describe=True)


def add_runtime_collectors(registry: CollectorRegistry) -> CollectorRegistry:
    """Register prometheus_client's process, platform and GC collectors on ``registry`` (returned)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


add_runtime_collectors(REGISTRY)

TASKS = Counter("dspex_tasks", "Predictions by signature and outcome (dspex.map counts each item).",
                ["signature", "outcome"], registry=REGISTRY)
TASK_DURATION = Histogram("dspex_task_duration_seconds", "Prediction duration by signature.", ["signature"],
                          buckets=DURATION_BUCKETS, registry=REGISTRY)
LM_CALLS = Counter("dspex_lm_calls", "Predictions that returned from the LM, and optimization runs' LM calls, "
                   "by model.", ["model"], registry=REGISTRY)
LM_TOKENS = Counter("dspex_lm_tokens", "LM tokens by model and kind (prompt, completion).", ["model", "kind"],
                    registry=REGISTRY)
LM_COST = Counter("dspex_lm_cost_usd", "Estimated LM cost in USD (LiteLLM's price table; 0 for unknown models).",
                  ["model"], registry=REGISTRY)
CACHE_HITS = Counter("dspex_program_cache_hits", "Program cache hits.", registry=REGISTRY)
CACHE_MISSES = Counter("dspex_program_cache_misses", "Program cache misses (a load from Redis).", registry=REGISTRY)
CACHE_SIZE = Gauge("dspex_program_cache_size", "Warm programs in the cache.", multiprocess_mode="livesum",
                   registry=REGISTRY)
OPTIMIZATION_RUNS = Counter("dspex_optimization_runs", "Finished optimization runs by optimizer and outcome.",
                            ["optimizer", "outcome"], registry=REGISTRY)
PROMOTIONS = Counter("dspex_promotions", "Candidate programs promoted by an optimization run.", ["signature"],
                     registry=REGISTRY)
IN_FLIGHT = Gauge("dspex_tasks_in_flight", "Prediction tasks executing now, by signature (a dspex.map message "
                  "counts once).", ["signature"], multiprocess_mode="livesum", registry=REGISTRY)

_TASK_OUTCOMES = ("success", "failure", "retry")
_RUN_OUTCOMES = ("succeeded", "failed", "cancelled")


def prime_series(signatures: list[str], models: list[str], optimizers: list[str]) -> None:
    """Create every series a dashboard expects at zero (failures, retries, in flight, each model's calls), so
    ``rate()`` and alerts see them before the first event rather than appearing when it happens."""
    for sig in signatures:
        for outcome in _TASK_OUTCOMES:
            TASKS.labels(sig, outcome)
        TASK_DURATION.labels(sig)
        IN_FLIGHT.labels(sig)
        PROMOTIONS.labels(sig)
    for model in models:
        LM_CALLS.labels(model)
        LM_COST.labels(model)
        for kind in ("prompt", "completion"):
            LM_TOKENS.labels(model, kind)
    for optimizer in optimizers:
        for outcome in _RUN_OUTCOMES:
            OPTIMIZATION_RUNS.labels(optimizer, outcome)


# -- the plain mirror written to Redis -----------------------------------------------------------------------
_lock = threading.Lock()
_snap: dict[str, Any] = {}


def reset_snapshot() -> None:
    """Forget the mirrored counters (the Prometheus counters are never reset)."""
    with _lock:
        _snap.clear()
        _snap.update({"tasks": {}, "lm": {}, "runs": {}, "promotions": {}})


reset_snapshot()


def _bump(path: tuple[str, ...], amount: float = 1) -> None:
    with _lock:
        node = _snap
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = node.get(path[-1], 0) + amount


def snapshot() -> dict[str, Any]:
    """This process's counters as JSON-ready data (with its metrics port when serving)."""
    with _lock:
        data: dict[str, Any] = json.loads(json.dumps(_snap))
    port = served_port()
    if port is not None:
        data["port"] = port
    return data


def snapshot_json(stats: Any = None) -> str:
    """:func:`snapshot` as compact JSON; given the runtime's cache stats, exports them first."""
    if stats is not None:
        sync_cache(stats)
    return json.dumps(snapshot(), separators=(",", ":"))


# -- recording -------------------------------------------------------------------------------------------
def record_task(signature: str, outcome: str, duration_s: float | None = None) -> None:
    TASKS.labels(signature, outcome).inc()
    if duration_s is not None and duration_s >= 0:
        TASK_DURATION.labels(signature).observe(duration_s)
    _bump(("tasks", signature, outcome))


def record_lm(model: str, usage: Mapping[str, Any] | None, calls: int = 1) -> None:
    """LM use: one prediction's (a call, its tokens and their estimated cost), or, with ``calls``, what an
    optimization stage or evaluation chunk spent in that many calls."""
    usage = usage or {}
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    cost = estimate_cost(model, prompt, completion)
    if calls <= 0 and not (prompt or completion):
        return
    LM_CALLS.labels(model).inc(max(calls, 0))
    if prompt:
        LM_TOKENS.labels(model, "prompt").inc(prompt)
    if completion:
        LM_TOKENS.labels(model, "completion").inc(completion)
    LM_COST.labels(model).inc(cost)
    with _lock:
        entry = _snap["lm"].setdefault(model, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                               "cost_usd": 0.0})
        entry["calls"] += max(calls, 0)
        entry["prompt_tokens"] += prompt
        entry["completion_tokens"] += completion
        entry["cost_usd"] += cost


def record_result(signature: str, result: Mapping[str, Any], duration_s: float | None = None) -> None:
    """A successful prediction's result JSON (``outputs``, ``usage``, ``lm``, ``duration_ms``...)."""
    if duration_s is None:
        ms = result.get("duration_ms")
        duration_s = float(ms) / 1000 if isinstance(ms, int | float) else None
    record_task(signature, "success", duration_s)
    if result.get("lm"):
        record_lm(str(result["lm"]), result.get("usage"))


def record_run(optimizer: str, outcome: str, *, promoted: str | None = None) -> None:
    """An optimization run reached a terminal state (succeeded, failed, cancelled); ``promoted``: its signature
    when it promoted a candidate."""
    OPTIMIZATION_RUNS.labels(optimizer or "unknown", outcome).inc()
    _bump(("runs", optimizer or "unknown", outcome))
    if promoted:
        record_promotion(promoted)


def record_promotion(signature: str) -> None:
    PROMOTIONS.labels(signature).inc()
    _bump(("promotions", signature))


def sync_cache(stats: Any) -> None:
    """Export a runtime's plain cache counters (``CacheStats``): add what grew since the last call."""
    with _lock:
        hits, misses = int(stats.hits), int(stats.misses)
        last_hits, last_misses = getattr(stats, "_dspex_exported", (0, 0))
        if hits < last_hits or misses < last_misses:  # counters were reset
            last_hits = last_misses = 0
        stats._dspex_exported = (hits, misses)
    if hits > last_hits:
        CACHE_HITS.inc(hits - last_hits)
    if misses > last_misses:
        CACHE_MISSES.inc(misses - last_misses)
    CACHE_SIZE.set(int(stats.size))


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


# -- cost --------------------------------------------------------------------------------------------------
def estimate_cost(model: str, prompt_tokens: int, completion_tokens: int) -> float:
    """USD for the tokens by LiteLLM's price table (the one price table: :func:`dspex_tasks.lm.usage.price`);
    0.0 for a model it does not know (or the mock)."""
    return price(model, prompt_tokens, completion_tokens)[0]


# -- Celery signals --------------------------------------------------------------------------------------
_started: dict[str, tuple[float, str]] = {}


def signature_of(task_name: str, kwargs: Mapping[str, Any] | None = None) -> str | None:
    """The signature a task serves (``dspex.<name>``, or ``dspex.map``'s ``signature`` kwarg); None otherwise."""
    if task_name == MAP_TASK:
        sig = (kwargs or {}).get("signature")
        return sig if isinstance(sig, str) and sig else "unknown"
    return program_of(task_name)


def on_task_prerun(sender: Any = None, task_id: str | None = None, task: Any = None, kwargs: Any = None,
                   **_: Any) -> None:
    if not task_id:
        return
    sig = signature_of(str(getattr(task, "name", "") or ""), kwargs if isinstance(kwargs, Mapping) else None)
    if sig is None:
        return
    known = getattr(getattr(task, "app", None), "dspex_signatures", None)
    if known is not None and known.find(sig) is None:  # bound the label values to served signatures
        sig = "unknown"
    _started[task_id] = (time.perf_counter(), sig)
    with contextlib.suppress(Exception):
        IN_FLIGHT.labels(sig).inc()


def on_task_postrun(sender: Any = None, task_id: str | None = None, task: Any = None, kwargs: Any = None,
                    retval: Any = None, state: str | None = None, **_: Any) -> None:
    """Count one execution of a prediction task (each item of a ``dspex.map``); never raises."""
    try:
        started = _started.pop(task_id, None) if task_id else None
        t0 = None
        if started is not None:
            t0 = started[0]
            IN_FLIGHT.labels(started[1]).dec()
        name = str(getattr(task, "name", "") or "")
        kw = kwargs if isinstance(kwargs, Mapping) else {}
        sig = signature_of(name, kw)
        outcome = _OUTCOMES.get(str(state))
        if sig is None or outcome is None:
            return
        known = getattr(getattr(task, "app", None), "dspex_signatures", None)
        if known is not None and known.find(sig) is None:  # bound the label values to served signatures
            if name != MAP_TASK:
                return
            sig = "unknown"
        elapsed = time.perf_counter() - t0 if t0 is not None else None
        if name == MAP_TASK:
            _record_map(sig, kw, retval, outcome)
        elif outcome == "success" and isinstance(retval, Mapping):
            record_result(sig, retval, elapsed)
        else:
            record_task(sig, outcome, elapsed)
        runtime = getattr(getattr(task, "app", None), "_runtime", None)
        if runtime is not None:
            sync_cache(runtime.cache.stats)
    except Exception as exc:  # metrics must never fail a task
        log.warning("metrics: could not record task %s: %s", task_id, exc)


def _record_map(sig: str, kwargs: Mapping[str, Any], retval: Any, outcome: str) -> None:
    results = retval.get("results") if outcome == "success" and isinstance(retval, Mapping) else None
    if isinstance(results, list):
        for item in results:
            if isinstance(item, Mapping) and "error" not in item:
                record_result(sig, item)
            else:
                record_task(sig, "failure")
        return
    items = kwargs.get("items")  # the whole message failed (or will be retried): every item did
    for _ in range(len(items) if isinstance(items, list) and items else 1):
        record_task(sig, outcome)


# -- serving ---------------------------------------------------------------------------------------------
_server: Any = None
_server_port: int | None = None
_server_pid: int | None = None
_server_lock = threading.Lock()
_pending_child_port: int | None = None
_pending_child_addr = "127.0.0.1"


def multiprocess_mode() -> bool:
    """True when prometheus_client keeps values in ``PROMETHEUS_MULTIPROC_DIR``.

    prometheus_client decides once, at its import, from the environment, so the variable must be set
    before the worker starts (setting it later has no effect; this reports what is in force).
    """
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue


def served_port() -> int | None:
    """The port serving this process's metrics, or None: its own server, or in multiprocess mode the
    worker's main process (a prefork pool child's parent) that serves the sum."""
    if _server_pid == os.getpid() or (_server_pid is not None and _server_pid == os.getppid()
                                      and multiprocess_mode()):
        return _server_port
    return None


def start_server(port: int, *, addr: str = "127.0.0.1", scan: int = PORT_SCAN) -> int:
    """Serve ``/metrics`` from this process on ``port`` (0: any free port; in use: the next free one).

    Returns the bound port; a second call in the same process returns the first one's.
    """
    global _server, _server_port, _server_pid
    from prometheus_client import start_http_server

    with _server_lock:
        if _server is not None and _server_pid == os.getpid():
            return int(_server_port or 0)
        registry: Any = REGISTRY
        if multiprocess_mode():
            from prometheus_client import multiprocess

            registry = add_runtime_collectors(CollectorRegistry())  # this (main) process's own process_* series
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        candidates = [0] if port == 0 else list(range(port, min(port + max(1, scan), 65536)))
        last: OSError | None = None
        for candidate in candidates:
            try:
                server, _thread = start_http_server(candidate, addr=addr, registry=registry)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                last = exc
                continue
            _server, _server_port, _server_pid = server, int(server.server_port), os.getpid()
            return _server_port
        raise OSError(errno.EADDRINUSE, f"no free port in {port}..{candidates[-1]} for /metrics") from last


def stop_server() -> None:
    global _server, _server_port, _server_pid
    with _server_lock:
        if _server is not None:
            with contextlib.suppress(Exception):
                _server.shutdown()
                _server.server_close()
        _server = _server_port = _server_pid = None


def _serve(port: int, where: str, addr: str) -> None:
    try:
        bound = start_server(port, addr=addr)
    except OSError as exc:
        log.warning("metrics: could not serve /metrics (%s); continuing without", exc)
        return
    global _serving_note
    mode = " (multiprocess: the pool's children summed)" if multiprocess_mode() else ""
    host = f"[{addr}]" if ":" in addr else addr
    _serving_note = f"metrics: {where} serves http://{host}:{bound}/metrics{mode}"
    log.info("%s", _serving_note)


_serving_note: str | None = None


def on_worker_ready(**_: Any) -> None:
    """Repeat the serving line once the worker's logging is set up (``worker_init`` is too early for it)."""
    if _serving_note is not None and served_port() is not None:
        log.info("%s", _serving_note)


def on_worker_init(sender: Any = None, **_: Any) -> None:
    """The worker's main process: serve /metrics, unless prefork children must serve their own."""
    global _pending_child_port, _pending_child_addr
    app = getattr(sender, "app", None)
    settings = getattr(app, "dspex_settings", None)
    port = getattr(settings, "metrics_port", None)
    if port is None:
        return
    addr = str(getattr(settings, "metrics_host", None) or "127.0.0.1")
    pool = str(getattr(sender, "pool_cls", None) or getattr(getattr(app, "conf", None), "worker_pool", ""))
    if "prefork" in pool.lower() and not multiprocess_mode():
        log.warning("metrics: prefork pool without PROMETHEUS_MULTIPROC_DIR: each pool process serves its own "
                    "port from %d; set PROMETHEUS_MULTIPROC_DIR for one endpoint per worker", port)
        _pending_child_port, _pending_child_addr = int(port), addr
        return
    _serve(int(port), f"worker pid {os.getpid()}", addr)


def on_worker_process_init(**_: Any) -> None:
    """A prefork pool child: serve its own port when there is no multiprocess directory."""
    if _pending_child_port is not None:
        _serve(_pending_child_port, f"pool process {os.getpid()}", _pending_child_addr)


def on_worker_process_shutdown(pid: int | None = None, **_: Any) -> None:
    if multiprocess_mode():
        with contextlib.suppress(Exception):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid or os.getpid())  # type: ignore[no-untyped-call]


def install(app: Any = None) -> None:
    """Connect the collection and serving handlers to Celery's signals (once per process, whatever the apps)."""
    from celery import signals

    for signal, handler in ((signals.task_prerun, on_task_prerun), (signals.task_postrun, on_task_postrun),
                            (signals.worker_init, on_worker_init), (signals.worker_ready, on_worker_ready),
                            (signals.worker_process_init, on_worker_process_init),
                            (signals.worker_process_shutdown, on_worker_process_shutdown)):
        signal.connect(handler, weak=False, dispatch_uid=f"dspex.prometheus.{handler.__name__}")
