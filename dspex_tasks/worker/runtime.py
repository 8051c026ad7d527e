"""The worker-side runtime: one per worker process, pre-warmed at process start.

It owns the process's LM clients, the program store and cache, and runs one
prediction: cache lookup, the module call through the process's one
:class:`~dspex_tasks.worker.runner.ModuleRunner`, output validation, result JSON.
Celery tasks (:mod:`dspex_tasks.worker.tasks`) are thin wrappers around :meth:`Runtime.predict`.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import keys, wire
from ..connections import redis_client
from ..dsl.signature import Signature, SignatureRegistry, registry
from ..errors import ConfigurationError, DspexError, LMParseError, LMRateLimitError, ValidationError
from ..lm.factory import native_async
from ..lm.governed import build_signature_lm, plan_lm
from ..lm.ratelimit import RateLimited, claim
from ..lm.usage import UsageLedger
from ..programs.bridge import build_module
from ..programs.cache import ProgramCache
from ..programs.state import load_program
from ..programs.store import ProgramRecord, ProgramStore, ProgramStoreProtocol
from ..settings import Settings
from .dspy_patches import apply_dspy_speedups
from .live import CancelWatch, JobControl, run_on_loop, runs_async, settle_tokens, text_outputs
from .runner import ModuleRunner

__all__ = ["Runtime", "import_signature_modules", "publish_signatures", "signatures_missing",
           "check_eviction_policy"]

log = logging.getLogger(__name__)

#: Threads running ``dspex.map`` items of modules that cannot run as coroutines.
MAP_THREADS = 64
#: Map items of one chunk that may be building their first prompt at once on the event loop.
MAP_STARTING = 16
# Connections one DSPy LM object keeps (DSPy 3.4's lm15 transport default).
LM_CONNECTIONS = 100

#: How often a worker checks that its signatures are still published (Redis restarted without persistence).
REPUBLISH_CHECK_S = 2.0
#: How long ``dspex health`` reports that Redis lost its data (queued tasks and results with it).
DATA_LOSS_WINDOW_S = 600


def _run_id(redis: Any) -> str | None:
    from ..lost import server_run_id

    try:
        return server_run_id(redis)
    except Exception:  # noqa: BLE001 - INFO refused (managed Redis) or Redis away: unknown
        return None
#: How often a worker writes its session use times and cache counters.
FLUSH_S = 5.0


def import_signature_modules(modules: list[str], *, optional: frozenset[str] = frozenset()) -> list[str]:
    """Import the modules that define signatures; returns the ones imported.

    The current directory is searched first, as ``celery -A`` does, so a worker started from the
    module's own directory finds it however it was started. A module in ``optional`` that does not exist is
    skipped (the default's ``signatures.programs``, which a project's own ``signatures`` may not have).

    Raises:
        ConfigurationError: one line naming the module, ``DSPEX_SIGNATURE_MODULES`` and the search path
            (the module is not there), or the module's own error and where it happened (it failed).
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    imported: list[str] = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")):
                raise ConfigurationError(f"signature module '{name}' failed to import: {_where(exc)}") from None
            if name in optional and imported:
                log.info("no module '%s' (optional in the default DSPEX_SIGNATURE_MODULES); skipped", name)
                continue
            pythonpath = os.environ.get("PYTHONPATH") or "unset"
            raise ConfigurationError(
                f"cannot import signature module '{name}' (DSPEX_SIGNATURE_MODULES={','.join(modules)}): "
                f"no module '{exc.name}' in the current directory ({cwd}) or on PYTHONPATH ({pythonpath}); "
                "start the worker from the module's directory or add that directory to PYTHONPATH"
            ) from None
        except ConfigurationError:
            raise
        except Exception as exc:
            raise ConfigurationError(f"signature module '{name}' failed to import: {_where(exc)}") from None
        imported.append(name)
    return imported


def _where(exc: BaseException) -> str:
    """``NameError: name 'x' is not defined (mysigs.py:3)``: the error and the user's frame it came from."""
    import traceback

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "importlib" not in f.filename and not os.path.abspath(f.filename).startswith(package)]
    if not frames:
        return f"{type(exc).__name__}: {exc}"
    path = os.path.relpath(frames[-1].filename)
    where = f" ({frames[-1].filename if path.startswith('..') else path}:{frames[-1].lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


def _prime_metrics(sigs: list[Signature], lms: list[Any]) -> None:
    """Create the worker's metric series at zero (served signatures, their models, the optimizers)."""
    from ..lm.factory import lm_name
    from ..observability.prometheus import prime_series
    from ..optimize.optimizers import optimizer_names

    try:
        prime_series([s.name for s in sigs], sorted({lm_name(lm) for lm in lms}), optimizer_names())
    except Exception as exc:  # metrics never stop a worker from warming
        log.warning("metrics: could not create the series at zero: %s", exc)


def publish_signatures(redis: Any, namespace: str, sigs: list[Signature]) -> None:
    """Publish schemas so clients validate without dspy or the signature code."""
    if not sigs:
        return
    from ..optimize.metrics import metric_names
    from ..optimize.optimizers import optimizer_names, params_schemas

    mapping = {s.name: json.dumps(s.describe(), separators=(",", ":")) for s in sigs}
    pipe = redis.pipeline()
    pipe.hset(keys.signatures(namespace), mapping=mapping)
    # optimizer_params: each optimizer's params JSON Schema (its own and the common ones), for the client's check
    pipe.hset(keys.capabilities(namespace), mapping={
        "metrics": json.dumps(metric_names()), "optimizers": json.dumps(optimizer_names()),
        "optimizer_params": json.dumps(params_schemas(), separators=(",", ":"))})
    pipe.publish(keys.signature_events(namespace), json.dumps(sorted(mapping)))
    pipe.execute()


def signatures_missing(redis: Any, namespace: str, names: list[str]) -> bool:
    """Whether any of ``names`` (or the capabilities) is missing from Redis: it lost its data, or a key."""
    if not names:
        return False
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.hexists(keys.signatures(namespace), name)
    pipe.exists(keys.capabilities(namespace))
    return not all(pipe.execute())


SAFE_EVICTION = frozenset({"noeviction"})


def check_eviction_policy(redis: Any, allow_unsafe: bool) -> str | None:
    """Refuse a Redis that may evict keys: queued messages, results and programs would vanish silently."""
    try:
        policy = redis.config_get("maxmemory-policy").get("maxmemory-policy")
    except Exception as exc:  # managed Redis often forbids CONFIG: say so, do not guess
        log.warning("could not read Redis maxmemory-policy (%s); make sure it is 'noeviction'", exc)
        return None
    policy = policy.decode() if isinstance(policy, bytes) else policy
    if policy not in SAFE_EVICTION:
        message = (f"Redis maxmemory-policy is '{policy}': it may evict queued tasks, results and programs. "
                   "Set it to 'noeviction' (CONFIG SET maxmemory-policy noeviction), or set "
                   "DSPEX_ALLOW_UNSAFE_EVICTION=1 to run anyway")
        if not allow_unsafe:
            raise ConfigurationError(message)
        log.warning(message)
    return str(policy)


class Runtime:
    """Per-process state of a worker: LMs, store, program cache.

    Args:
        settings: the process settings.
        redis: a ``redis.Redis`` client (built from ``settings.redis_url`` when omitted).
        store: a program store (a :class:`ProgramStore` on ``redis`` when omitted).
        signatures: the registry to serve (the process-wide one by default).
    """

    def __init__(self, settings: Settings, *, redis: Any = None, store: ProgramStoreProtocol | None = None,
                 signatures: SignatureRegistry | None = None) -> None:
        self.settings = settings
        self.signatures = signatures or registry
        if redis is None and store is None:
            redis = redis_client(settings)
        self.redis = redis
        self.store: ProgramStoreProtocol = store or ProgramStore(
            redis=redis, namespace=settings.namespace, session_ttl_s=settings.session_ttl_s,
            max_state_bytes=settings.max_state_bytes)
        self.cache = ProgramCache(self.store, self._build, max_size=settings.program_cache_size,
                                  verify_s=settings.cache_verify_s)
        self._lms: dict[str, list[Any]] = {}
        self._rr = itertools.count()
        self._base: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._slots: Any = None  # asyncio.Semaphore(DSPEX_ASYNC_MAX_IN_FLIGHT) on the process's loop
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.warmed_at: float | None = None
        self._published = False
        self._run_id: str | None = None  # the Redis server's run_id when this worker published
        self._checked_at = 0.0
        self._flushed_at = time.monotonic()
        self._plans: dict[str, Any] = {}
        self.ledger = UsageLedger(redis, settings.namespace, session_ttl_s=settings.session_ttl_s,
                                  history_s=settings.usage_history_days * 86_400)
        self.cancels: CancelWatch | None = None  # the cancelled job ids, kept locally (started by warm)
        self.runner = ModuleRunner(self.ledger, self.lm_for)

    # -- warm-up ------------------------------------------------------------
    def warm(self, *, publish: bool = True, listen: bool = True) -> dict[str, Any]:
        """Configure LMs, build every signature's module, load the hottest sessions.

        Raises:
            ConfigurationError: Redis may evict keys (anything but ``noeviction``) and
                ``DSPEX_ALLOW_UNSAFE_EVICTION`` is not set.
        """
        t0 = time.perf_counter()
        if self.redis is not None:
            check_eviction_policy(self.redis, self.settings.allow_unsafe_eviction)
        _private_dspy_cache()
        apply_dspy_speedups()
        for sig in self.signatures:
            self.lm_for(sig)
            self._base[sig.name] = build_module(sig)
            self._base[sig.name]._dspex_signature = sig.name
        _prime_metrics(list(self.signatures), [self.lm_for(sig) for sig in self.signatures])
        loaded = 0
        if self.settings.prewarm_sessions and self.redis is not None:
            sessions = self.store.sessions()[: self.settings.prewarm_sessions]
            loaded = self.cache.prewarm(sessions, self.store.list)
        if publish and self.redis is not None:
            publish_signatures(self.redis, self.settings.namespace, list(self.signatures))
            self._published = True
            self._run_id = _run_id(self.redis)
        if listen and self.redis is not None:
            self.cancels = CancelWatch(self.redis, self.settings.namespace)
            self.cache.start_listener(self.redis, keys.program_events(self.settings.namespace),
                                      on_tick=self.tick, on_reconnect=self.republish, tick_s=1.0)
        self.warmed_at = time.time()
        info = {"signatures": len(self.signatures), "programs": loaded,
                "ms": round((time.perf_counter() - t0) * 1000, 1)}
        log.info("worker %s warm: %s", self.worker_id, info)
        return info

    def republish(self, *, check: bool = True) -> bool:
        """Publish this worker's signatures again if Redis lost them; returns whether it did.

        Redis restarted without persistence (or a key deleted) would otherwise leave clients answering
        ``UnknownSignature`` for as long as the workers live. Called on the listener's reconnect and, every
        :data:`REPUBLISH_CHECK_S`, from its tick; HSET of the same JSON is idempotent.
        """
        if not self._published or self.redis is None:
            return False
        names = [s.name for s in self.signatures]
        try:
            if check and not signatures_missing(self.redis, self.settings.namespace, names):
                return False
            publish_signatures(self.redis, self.settings.namespace, list(self.signatures))
        except Exception as exc:  # Redis still away: the next tick or reconnect tries again
            log.warning("could not republish signatures: %s", exc)
            return False
        log.warning("worker %s republished %d signatures (Redis had lost them)", self.worker_id, len(names))
        self._note_data_loss()
        return True

    def _note_data_loss(self) -> None:
        """When Redis restarted (a new ``run_id``) without the registry, say so for ``dspex health`` a while."""
        current = _run_id(self.redis)
        if current is None or self._run_id is None or current == self._run_id:
            return  # a deleted key, not a restart: queued work is still there
        self._run_id = current
        record = {"at": time.time(), "worker": self.worker_id, "run_id": current}
        try:
            self.redis.set(keys.data_lost(self.settings.namespace), json.dumps(record), ex=DATA_LOSS_WINDOW_S,
                           nx=True)  # the first worker to notice keeps its time
        except Exception as exc:  # noqa: BLE001 - Redis away again: the registry check still tells
            log.warning("could not record the data loss: %s", exc)

    def tick(self) -> None:
        """The listener thread's periodic work: republish lost signatures, flush every :data:`FLUSH_S`."""
        now = time.monotonic()
        if self._published and now - self._checked_at >= REPUBLISH_CHECK_S:
            self._checked_at = now
            self.republish()
        if now - self._flushed_at >= FLUSH_S:
            self._flushed_at = now
            self.flush()

    def flush(self) -> None:
        """Write batched session use times and cache counters (from the listener thread)."""
        used = self.cache.take_used()
        if self.redis is None:
            return
        try:
            if used:
                self.store.touch(used)  # type: ignore[attr-defined]
            from ..observability.prometheus import snapshot_json
            self.redis.hset(keys.worker_stats(self.settings.namespace, self.worker_id),
                            mapping={**self.cache.stats.as_dict(), "metrics": snapshot_json(self.cache.stats)})
            self.redis.expire(keys.worker_stats(self.settings.namespace, self.worker_id), 60)
        except Exception as exc:
            log.warning("could not record session use: %s", exc)

    def close(self) -> None:
        self.cache.stop()
        if self.cancels is not None:
            self.cancels.stop()
        self.ledger.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    # -- building -----------------------------------------------------------
    def lm_for(self, sig: Signature, *, recorded: bool = False) -> Any:
        """The LM for a signature; several instances round-robin when one cannot carry the concurrency.

        DSPy 3.4's native HTTP engine caps each LM object at 100 connections, so with more threads (or
        coroutines, up to ``DSPEX_ASYNC_MAX_IN_FLIGHT``) than that one LM would queue calls behind its own pool. ``recorded=True`` wraps even the
        in-process mock in the governed LM, which reports every call to the usage scope: an optimizer's
        own threads have no prediction to read usage from.
        """
        plan = self._plans.get(sig.name) or self._plans.setdefault(sig.name, plan_lm(self.settings, sig.name,
                                                                                      sig.options))
        if recorded and not plan.governed:
            plan = dataclasses.replace(plan, governed=True, key=f"governed:{plan.route.key}")
        pool = self._lms.get(plan.key)
        if pool is None:
            with self._lock:
                pool = self._lms.get(plan.key)
                if pool is None:
                    first = build_signature_lm(self.settings, plan, self.redis)
                    size = 1 if plan.in_process else max(1, -(-self._max_in_flight() // LM_CONNECTIONS))
                    pool = self._lms[plan.key] = [first] + [build_signature_lm(self.settings, plan, self.redis)
                                                            for _ in range(size - 1)]
        if len(pool) == 1:
            return pool[0]
        return pool[next(self._rr) % len(pool)]

    def _max_in_flight(self) -> int:
        """The most LM calls this process makes at once: one per thread, or the event loop's cap."""
        s = self.settings
        return max(s.worker_concurrency, s.async_max_in_flight if s.async_modules else 0)

    def _build(self, program: str, record: ProgramRecord | None) -> Any:
        name = (record.signature if record else None) or program
        sig = self.signatures.find(name)
        if sig is None:
            # A stored program named differently from its signature, with no signature recorded.
            return None
        if record is None:
            module = self._base.get(sig.name)
            if module is None:
                module = self._base[sig.name] = build_module(sig)
                module._dspex_signature = sig.name  # so a task of another signature refuses it
            return module
        module = load_program(sig, record.state)
        module._dspex_signature = sig.name
        return module

    # -- serving ------------------------------------------------------------
    def predict(self, sig: Signature, inputs: Any, session: str | None = None,
                program: str | None = None, options: wire.Options | None = None,
                control: JobControl | None = None) -> wire.PredictResult:
        """Validate, run and validate again; returns the result JSON of ARCHITECTURE section 2.

        ``options`` are per-request options already checked by ``wire.check_options`` (the task checks them):
        ``lm_config`` for every LM call of the run, ``trace`` adds the result's ``"trace"``. ``control`` is the
        job's live side (:mod:`.live`): cancellation, ``timeout_s`` and, when streamed, its events.
        """

        t0 = time.perf_counter()
        clean, module, version, program = self._prepare(sig, inputs, session, program)
        opts = options or {}
        # One prediction runs in its task's thread even when its module could run as a coroutine: the thread
        # waits either way, and the hand-offs to the loop cost CPU (measured: BENCHMARKS.md, issue 15).
        run = self.runner.run(sig, module, clean, session, lm_config=opts.get("lm_config"),
                              trace=opts.get("trace", False), control=control)
        return self._result(sig, run, session, program, version, t0, control)

    def _runs_async(self, sig: Signature, module: Any) -> bool:
        """Whether map items run as coroutines on the process's loop: the module can (``aforward``, no sync
        tools) and so can its LM (DSPEX_ASYNC_MODULES on)."""
        if not self.settings.async_modules or not runs_async(module):
            return False
        return native_async(self.lm_for(sig, recorded=sig.kind == "program"))

    def _prepare(self, sig: Signature, inputs: Any, session: str | None, program: str | None
                 ) -> tuple[dict[str, Any], Any, int, str]:
        """Checked inputs, the module serving them, its version and the program's name."""
        clean = sig.validate_inputs(inputs)
        program = keys.check_id(program, "program") if program is not None else sig.name
        if session is not None:
            keys.check_id(session, "session")
            module, version = self.cache.get(session, program)
        else:
            module, version = self._base.get(sig.name) or self._build(sig.name, None), 0
        if module is None or getattr(module, "_dspex_signature", sig.name) != sig.name:
            raise ValidationError.from_errors(
                f"program for '{sig.name}'",
                [{"field": "program", "message": f"program '{program}' does not serve signature '{sig.name}'"}])
        return clean, module, version, program

    def _result(self, sig: Signature, run: Any, session: str | None, program: str, version: int, t0: float,
                control: JobControl | None = None) -> wire.PredictResult:
        raw = {name: run.prediction.get(name) for name in sig.output_fields}
        try:
            outputs = sig.validate_outputs(raw)
        except ValidationError as exc:
            raise LMParseError(f"LM output for signature '{sig.name}' does not fit it: {exc.message}",
                               exc.errors) from None
        if control is not None and control.streaming:
            settle_tokens(control, outputs, text_outputs(sig.output_fields))
        result: wire.PredictResult = {
            "outputs": outputs,
            "session": session,
            "program": program,
            "program_version": version,
            "usage": run.usage,
            "lm": run.lm,
            "duration_ms": round((time.perf_counter() - t0) * 1000, 3),
            "worker": self.worker_id,
        }
        if run.trace is not None:
            result["trace"] = run.trace
        return result

    def predict_many(self, sig: Signature, items: list[Any], session: str | None = None,
                     program: str | None = None, options: wire.Options | None = None) -> list[dict[str, Any]]:
        """Run many predictions concurrently (each with ``options``); each item is a result or ``{"error": ...}``.

        A module that runs as a coroutine runs every item on the process's event loop at once (each LM call
        waits without a thread); any other runs them on a pool of :data:`MAP_THREADS` threads.
        """
        opts = options or {}
        try:
            _, module, _, _ = self._prepare(sig, items[0] if items else {}, session, program)
            concurrent = self._runs_async(sig, module)
        except DspexError:
            concurrent = False  # the first item's own error is reported in its place below
        if concurrent and len(items) > 1:
            return list(run_on_loop(self._amany(sig, items, session, program, opts)))

        def one(inputs: Any) -> Any:  # a wire.PredictResult or {"error": wire.ItemError}
            claim(None)  # a pool thread must not keep a previous item's slot
            deadline = time.monotonic() + self.settings.rate_limit_max_queue_s
            while True:
                try:
                    return self.predict(sig, inputs, session, program, options)
                except RateLimited as exc:  # a map item has no message of its own to re-queue: it waits
                    if time.monotonic() + exc.countdown_s > deadline:
                        return {"error": self._limit_error(exc)}
                    time.sleep(exc.countdown_s)
                    claim(exc.slot)
                except DspexError as exc:
                    return {"error": wire.item_error(exc)}

        if len(items) <= 1:
            return [one(i) for i in items]
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=MAP_THREADS, thread_name_prefix="dspex-map")
        return list(self._pool.map(one, items))

    async def _amany(self, sig: Signature, items: list[Any], session: str | None, program: str | None,
                     opts: wire.Options) -> list[Any]:
        import asyncio

        if self._slots is None:  # made on the loop, which it belongs to
            self._slots = asyncio.Semaphore(self.settings.async_max_in_flight)
        slots = self._slots
        # Items start a few at a time: each one's prompt is built before its request goes out, so 500 started
        # at once would send nothing until all 500 were built, then wait together (a wave, not a pipeline).
        # An item's permit is returned when its first LM call starts (the LM-call gate) or when it ends.
        starting = asyncio.Semaphore(MAP_STARTING)
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        async def one(inputs: Any) -> Any:
            async with slots:
                await starting.acquire()
                started = False

                def start() -> None:  # called by the LM-call gate, on the loop (or, via DSPy, a thread)
                    nonlocal started
                    if not started:
                        started = True
                        if threading.get_ident() == loop_thread:
                            starting.release()
                        else:
                            loop.call_soon_threadsafe(starting.release)

                try:
                    return await attempt(inputs, start)
                finally:
                    start()

        async def attempt(inputs: Any, start: Any) -> Any:
            claim(None)
            deadline = time.monotonic() + self.settings.rate_limit_max_queue_s
            while True:
                t0 = time.perf_counter()
                try:
                    clean, module, version, name = self._prepare(sig, inputs, session, program)
                    run = await self.runner.arun(sig, module, clean, session, lm_config=opts.get("lm_config"),
                                                 trace=opts.get("trace", False), gate=start)
                    return self._result(sig, run, session, name, version, t0)
                except RateLimited as exc:
                    if time.monotonic() + exc.countdown_s > deadline:
                        return {"error": self._limit_error(exc)}
                    await asyncio.sleep(exc.countdown_s)
                    claim(exc.slot)
                except DspexError as exc:
                    return {"error": wire.item_error(exc)}

        return list(await asyncio.gather(*(one(i) for i in items)))

    def _limit_error(self, exc: RateLimited) -> wire.ItemError:
        return wire.item_error(LMRateLimitError(f"rate limit: no slot within DSPEX_RATE_LIMIT_MAX_QUEUE_S="
                                                f"{self.settings.rate_limit_max_queue_s:g}s: {exc.message}"))


_cache_configured = False


def _private_dspy_cache() -> None:
    """DSPy's on-disk cache pickles; keep it off. The in-memory cache stays (per process)."""
    global _cache_configured
    if _cache_configured:
        return
    import dspy

    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True,
                         disk_cache_dir=tempfile.mkdtemp(prefix="dspex-dspy-cache-"), restrict_pickle=True)
    _cache_configured = True
