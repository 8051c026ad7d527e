"""Live execution on a worker: a job's events, its cancellation and time bound, and token streaming.

- :class:`JobControl` is one job's control: its event writer (``stream=True`` only), its deadline
  (``timeout_s`` from submission) and its cancel key. :meth:`JobControl.check` raises :class:`JobStopped` when
  the job must stop.
- Every LM call passes the job's gate first (:mod:`dspex_tasks.lm.gate`: the governed LM and the mock LM call
  :meth:`JobControl.check`), so a cancelled or timed-out job stops before its next LM call; a job pays no
  DSPy callback for it.
- :class:`LiveCallback`, installed for streamed jobs only, is a DSPy callback (``BaseCallback``, DSPy's own
  hooks, not log parsing): module and predictor starts and ends become ``step`` events, tool calls ``tool``
  events (and a stopped job stops before its next tool too), and the current predictor becomes the task's
  ``PROGRESS`` state (Flower).
- :func:`stream_run` runs a module under ``dspy.streamify`` with one ``StreamListener`` per text output of the
  interface and per predictor that produces it; the chunks become ``token`` events. DSPy's sync streaming needs
  an event loop (its LM sends chunks with ``anyio.from_thread``): every streamed job of a process shares one
  long-lived loop in a daemon thread (:func:`process_loop`), and the job's own thread writes the events.

Cancellation is cooperative (Celery cannot stop a thread): :class:`JobStopped` derives from ``BaseException``
so that DSPy's ``except Exception`` around callbacks, tools and retries lets it through, and
:meth:`~dspex_tasks.worker.runner.ModuleRunner.run` turns it into ``errors.Cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import live
from ..errors import Cancelled
from .intake import event_dispatcher

__all__ = ["JobStopped", "CancelWatch", "JobControl", "LiveCallback", "make_callback", "stream_run", "settle_tokens",
           "process_loop", "run_on_loop", "runs_async", "text_outputs", "control_for"]

log = logging.getLogger(__name__)


class JobStopped(BaseException):  # noqa: N818 - a control-flow signal, like KeyboardInterrupt
    """Raised inside a running program when its job was cancelled or ran out of time."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CancelWatch:
    """A worker process's local copy of the cancelled job ids, so checking one costs no Redis round trip.

    A daemon thread subscribes to the cancel channel, then (re)loads the sorted set of live cancellations, so
    nothing published while it was away is missed. Until it has loaded once (or while it is disconnected), a
    check asks Redis for the job's cancel key instead.
    """

    def __init__(self, redis: Any, namespace: str) -> None:
        self.redis = redis
        self.namespace = namespace
        self._ids: dict[str, float] = {}
        self._ready = threading.Event()
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="dspex-cancel-watch", daemon=True).start()

    def reason(self, job_id: str) -> str | None:
        """Why ``job_id`` was cancelled, or None."""
        if not self._ready.is_set():
            return live.cancel_reason(self.redis, self.namespace, job_id)
        expires = self._ids.get(job_id)
        if expires is None or expires < time.time():
            return None
        return live.cancel_reason(self.redis, self.namespace, job_id) or "cancelled by request"

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from .. import keys

        backoff = 0.1
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(keys.job_cancel_events(self.namespace))
                now = time.time()
                loaded = self.redis.zrangebyscore(keys.job_cancels(self.namespace), now, "+inf", withscores=True)
                self._ids = {(k.decode() if isinstance(k, bytes) else str(k)): float(v) for k, v in loaded}
                self._ready.set()
                backoff = 0.1
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=1.0)
                    if msg and msg.get("type") == "message":
                        data = msg["data"]
                        self._ids[data.decode() if isinstance(data, bytes) else str(data)] = time.time() + 86_400
                    elif len(self._ids) > 10_000:
                        now = time.time()
                        self._ids = {k: v for k, v in self._ids.items() if v >= now}
            except Exception as exc:  # noqa: BLE001 - Redis away: checks go to Redis until reconnected
                self._ready.clear()
                log.warning("cancel watch lost its connection (%s); retrying", exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()


class JobControl:
    """One job's live side.

    Args:
        redis: Where the cancel key and the event stream are (None: only the deadline is checked).
        namespace: The key namespace.
        job_id: The task id.
        stream: Write events (``stream=True``).
        deadline: Unix time past which the job stops (``timeout_s`` after its submission), or None.
        maxlen, ttl_s: The event stream's bounds.
        on_step: Called with the current predictor's name when one starts (the task's ``PROGRESS`` state).
    """

    def __init__(self, redis: Any, namespace: str, job_id: str, *, stream: bool = False,
                 deadline: float | None = None, timeout_s: float | None = None, maxlen: int = 10_000,
                 ttl_s: int = 3600, on_step: Callable[[str], None] | None = None,
                 cancels: CancelWatch | None = None) -> None:
        self.redis = redis
        self.cancels = cancels
        self.namespace = namespace
        self.job_id = job_id
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.writer = live.EventWriter(redis, namespace, job_id, maxlen=maxlen, ttl_s=ttl_s) \
            if stream and redis is not None else None
        self.on_step = on_step
        self.tokens: dict[str, _TokenState] = {}  # what each text field streamed since its last reset

    @property
    def streaming(self) -> bool:
        return self.writer is not None

    def stop_reason(self) -> str | None:
        """Why the job must stop now (cancelled, or past its ``timeout_s``), else None."""
        if self.deadline is not None and time.time() >= self.deadline:
            return f"job {self.job_id} exceeded its timeout_s={self.timeout_s:g}"
        if self.cancels is not None:
            reason = self.cancels.reason(self.job_id)
        elif self.redis is not None:
            reason = live.cancel_reason(self.redis, self.namespace, self.job_id)
        else:
            return None
        return None if reason is None else f"job {self.job_id} was cancelled: {reason}"

    def check(self) -> None:
        """Raise :class:`JobStopped` when the job must stop."""
        reason = self.stop_reason()
        if reason is not None:
            raise JobStopped(reason)

    def check_start(self) -> None:
        """At the job's start: raise ``errors.Cancelled`` when it must not run at all."""
        reason = self.stop_reason()
        if reason is not None:
            raise Cancelled(reason)

    def emit(self, event_type: str, **fields: Any) -> None:
        """Queue one event (written in the background; best effort, never raised into the program)."""
        if self.writer is not None:
            self.writer.emit(event_type, **fields)

    def flush(self) -> None:
        """Wait until this job's events are written (before its result is stored)."""
        if self.writer is not None and not self.writer.flush():
            log.warning("job %s: its live events were not all written in time", self.job_id)


def _base_callback() -> type:
    from dspy.utils.callback import BaseCallback

    base: type = BaseCallback
    return base


def _names(module: Any) -> dict[int, tuple[str, str]]:
    """id(sub-module) -> (name, kind) for the served module's own parts, named as ``named_predictors()`` names
    them (``draft.predict``); the module itself is ``self``, as DSPy calls a lone predictor."""
    import dspy

    names: dict[int, tuple[str, str]] = {}
    for name, sub in module.named_sub_modules():
        kind = "predictor" if isinstance(sub, dspy.Predict) else "module"
        names.setdefault(id(sub), (name.removeprefix("self.") if name != "self" else name, kind))
    return names


def make_callback(control: JobControl, module: Any) -> Any:
    """The :class:`LiveCallback` for one run of ``module`` (a subclass of DSPy's ``BaseCallback``)."""
    return _live_callback_class()(control, module)


_CALLBACK_CLASS: type | None = None


def _live_callback_class() -> type:
    global _CALLBACK_CLASS
    if _CALLBACK_CLASS is None:
        _CALLBACK_CLASS = type("LiveCallback", (LiveCallback, _base_callback()), {})
    return _CALLBACK_CLASS


class LiveCallback:
    """DSPy hooks of one job (mixed into ``BaseCallback`` by :func:`make_callback`; dspy is imported lazily)."""

    def __init__(self, control: JobControl, module: Any) -> None:
        self.control = control
        self.names = _names(module) if control.streaming else {}
        self.calls: dict[str, tuple[str, str]] = {}
        self.tools: dict[str, str] = {}

    # -- steps --------------------------------------------------------------------------------------------
    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        if not self.control.streaming:
            return
        name, kind = self.names.get(id(instance)) or (type(instance).__name__, "module")
        self.calls[call_id] = (name, kind)
        self.control.emit("step", phase="start", name=name, kind=kind)
        if kind == "predictor" and self.control.on_step is not None:
            try:
                self.control.on_step(name)
            except Exception as exc:  # noqa: BLE001 - the PROGRESS state is best effort
                log.debug("could not record step %s: %s", name, exc)

    def on_module_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        named = self.calls.pop(call_id, None)
        if named is None:
            return
        extra = {"error": f"{type(exception).__name__}: {exception}"[:500]} if exception is not None else {}
        self.control.emit("step", phase="end", name=named[0], kind=named[1], **extra)

    # -- tools --------------------------------------------------------------------------------------------
    def on_tool_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.control.check()
        if not self.control.streaming:
            return
        from .trace import json_safe

        name = str(getattr(instance, "name", None) or type(instance).__name__)
        if name == "finish":  # ReAct's own end marker, not a tool of the user's
            return
        self.tools[call_id] = name
        args = inputs.get("kwargs", inputs)
        self.control.emit("tool", phase="start", name=name, arguments=json_safe(args))

    def on_tool_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        name = self.tools.pop(call_id, None)
        if name is None:
            return
        from .trace import json_safe

        if exception is not None:
            self.control.emit("tool", phase="end", name=name, error=f"{type(exception).__name__}: {exception}"[:2000])
        else:
            self.control.emit("tool", phase="end", name=name, result=json_safe(outputs))


def text_outputs(output_fields: dict[str, str]) -> list[str]:
    """The interface's outputs that stream as text (type ``str``)."""
    return [name for name, kind in output_fields.items() if kind == "str"]


# -- the process's event loop --------------------------------------------------------------------------------
#: Threads of the loop's default executor (``asyncio.to_thread``).
LOOP_THREADS = 64
_loop: asyncio.AbstractEventLoop | None = None
_loop_pid: int | None = None
_loop_lock = threading.Lock()


def process_loop() -> asyncio.AbstractEventLoop:
    """The process's one long-lived event loop (a daemon thread), started on first use (after a fork too)."""
    global _loop, _loop_pid
    loop = _loop
    if loop is not None and _loop_pid == os.getpid() and loop.is_running():
        return loop
    with _loop_lock:
        # after a fork the parent's loop looks running but has no thread in this process: make a new one
        if _loop is None or _loop_pid != os.getpid() or not _loop.is_running():
            new = asyncio.new_event_loop()
            # asyncio.to_thread's pool (Redis round trips of the cache and rate limits, DSPy's price lookups):
            # the default, cpu + 4 threads, would queue them behind each other under hundreds of jobs
            new.set_default_executor(ThreadPoolExecutor(max_workers=LOOP_THREADS, thread_name_prefix="dspex-loop-io"))
            started = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(new)
                new.call_soon(started.set)
                new.run_forever()

            threading.Thread(target=serve, name="dspex-live-loop", daemon=True).start()
            started.wait(5.0)
            _loop, _loop_pid = new, os.getpid()
        return _loop


def run_on_loop(coro: Any) -> Any:
    """Run a coroutine on the process's loop from a worker thread and wait for its result (its exception).

    The coroutine inherits this thread's context (DSPy's settings, the usage scope, the rate-limit claim): the
    loop's handle for it is made here, with a copy of it.
    """
    return asyncio.run_coroutine_threadsafe(coro, process_loop()).result()


class _TokenState:
    """What was streamed for one field since its last reset."""

    __slots__ = ("sent", "open")

    def __init__(self) -> None:
        self.sent = ""
        self.open = False


def stream_run(module: Any, inputs: dict[str, Any], control: JobControl, fields: list[str]) -> Any:
    """Run ``module(**inputs)`` under ``dspy.streamify``, writing ``token`` events; returns the prediction.

    Must run inside the job's DSPy context (the runner's): streamify reads the callbacks from it, and the
    coroutine on the process loop inherits it. After the prediction, :func:`settle_tokens` makes the chunks of
    each field equal the final value (a cache hit streams nothing; ``Refine`` may keep an earlier attempt).
    """
    import dspy

    # A module with aforward runs as a coroutine on the loop; any other in a thread of DSPy's (AnyIO's): measured,
    # the thread hop and its per-chunk hand-offs doubled a streamed Predict's worker CPU.
    streamer = dspy.streamify(module, stream_listeners=_listeners(module, fields),
                              include_final_prediction_in_output_stream=True, async_streaming=True,
                              is_async_program=runs_async(module))
    out: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    # The PROGRESS state (a Redis write) is written from the job's thread, in order with the tokens: the shared
    # loop never waits on Redis, and no step lands after the job's result.
    inline_step = control.on_step
    if inline_step is not None:
        control.on_step = lambda name: out.put(("step", name))

    async def pump() -> None:
        try:
            async for value in streamer(**inputs):
                out.put(("value", value))
            out.put(("done", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the job's thread, raised there
            out.put(("error", exc))

    future = asyncio.run_coroutine_threadsafe(pump(), process_loop())
    states = control.tokens
    prediction = None
    try:
        while True:
            kind, value = out.get()
            if kind == "done":
                break
            if kind == "error":
                raise value
            if kind == "step":
                try:
                    inline_step(value)  # type: ignore[misc]
                except Exception as exc:  # noqa: BLE001 - the PROGRESS state is best effort
                    log.debug("could not record step %s: %s", value, exc)
                continue
            if isinstance(value, dspy.streaming.StreamResponse):
                _token(control, states, value)
            elif isinstance(value, dspy.Prediction):
                prediction = value
    finally:
        control.on_step = inline_step
        if not future.done():
            future.cancel()
    return prediction


def _listeners(module: Any, fields: list[str]) -> list[Any]:
    """One listener per text output of the interface and per predictor producing it (reused across calls)."""
    import dspy

    listeners = []
    for name, predictor in module.named_predictors():
        for field in fields:
            if field in predictor.signature.output_fields:
                listeners.append(dspy.streaming.StreamListener(signature_field_name=field, predict=predictor,
                                                               predict_name=name, allow_reuse=True))
    return listeners


def runs_async(module: Any) -> bool:
    """Whether ``module`` runs as a coroutine: it defines ``aforward`` and holds no synchronous tool (DSPy calls
    a sync tool inline in ``acall``, which would stall every job on the loop; those modules run in threads)."""
    import inspect

    if not inspect.iscoroutinefunction(getattr(type(module), "aforward", None)):
        return False
    cached = getattr(module, "_dspex_runs_async", None)
    if cached is not None:
        return bool(cached)
    ok = True
    for _, sub in module.named_sub_modules():
        tools = getattr(sub, "tools", None)
        if isinstance(tools, dict):
            for name, tool in tools.items():
                func = getattr(tool, "func", None)
                if name != "finish" and func is not None and not inspect.iscoroutinefunction(func):
                    ok = False
    with contextlib.suppress(AttributeError):  # a module that refuses attributes is checked each time
        module._dspex_runs_async = ok
    return ok


def _token(control: JobControl, states: dict[str, _TokenState], response: Any) -> None:
    field = response.signature_field_name
    state = states.setdefault(field, _TokenState())
    chunk = response.chunk or ""
    if not state.open:
        state.open = True
        if state.sent:  # a new LM call for a field that streamed before: it starts over
            state.sent = ""
            control.emit("token", field=field, chunk="", predictor=response.predict_name, reset=True)
    if chunk:
        state.sent += chunk
        control.emit("token", field=field, chunk=chunk, predictor=response.predict_name)
    if getattr(response, "is_last_chunk", False):
        state.open = False


def settle_tokens(control: JobControl, outputs: dict[str, Any], fields: list[str]) -> None:
    """Make each text field's chunks (since its last reset), joined, equal its final value."""
    states = control.tokens
    for field in fields:
        value = outputs.get(field)
        if not isinstance(value, str):
            continue
        sent = states[field].sent if field in states else ""
        if sent == value:
            continue
        if value.startswith(sent):
            control.emit("token", field=field, chunk=value[len(sent):], predictor=None)
        else:
            control.emit("token", field=field, chunk=value, predictor=None, reset=True)


def control_for(task: Any, options: dict[str, Any]) -> JobControl:
    """The control of the job ``task`` is running (call :meth:`JobControl.check_start` next).

    ``timeout_s`` counts from the submission (the message's send-time header; the start when a sender gave
    none), so time spent queued counts. The ``PROGRESS`` state and Flower's ``task-progress`` event name the
    task by id and worker explicitly: DSPy may call back from threads where Celery's request is not current.
    """
    from ..wire import SENT_AT_HEADER, header

    settings = task.app.dspex_settings
    runtime = getattr(task.app, "runtime", None)
    redis = getattr(runtime, "redis", None)
    timeout_s = options.get("timeout_s")
    deadline = None
    if timeout_s is not None:
        sent = header(task.request, SENT_AT_HEADER)
        start = float(sent) if isinstance(sent, int | float) and not isinstance(sent, bool) else time.time()
        deadline = min(start, time.time()) + float(timeout_s)
    task_id = str(task.request.id)
    hostname = getattr(task.request, "hostname", None)

    # Celery keeps one result backend per thread and builds it on first use (a Redis client and pool, package
    # metadata read from disk): DSPy calls back from its own threads (streamify runs a sync module in AnyIO's),
    # so take this thread's backend and request now, not there (measured: 4% of a streamed job's CPU).
    backend, request = task.backend, task.request

    def on_step(name: str) -> None:
        backend.store_result(task_id, {"step": name, "job": task_id, "ts": time.time()}, "PROGRESS", request=request)
        fields = {"uuid": task_id, "step": name, "result": f"step: {name}"}  # result: Flower's Result column
        batched = event_dispatcher(task.app)
        if batched is not None:  # with Celery's own task events, flushed every 100 ms: no publish of its own
            batched.send("task-progress", **fields)
        elif hostname and settings.task_events:  # a process without the consumer (a prefork child)
            with task.app.events.default_dispatcher(hostname=hostname) as dispatcher:
                dispatcher.send("task-progress", **fields)

    return JobControl(redis, settings.namespace, task_id, stream=bool(options.get("stream")),
                      deadline=deadline, timeout_s=timeout_s, maxlen=settings.stream_maxlen,
                      ttl_s=settings.stream_ttl_s, on_step=on_step, cancels=getattr(runtime, "cancels", None))
