"""The client: validate against published schemas, enqueue, wait for typed results.

It imports neither dspy nor litellm nor the signature modules: workers publish
each signature's JSON Schemas to Redis, and the client validates inputs
against them (with ``jsonschema``) before anything is enqueued.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from . import keys, live, wire
from .connections import redis_client, typed_store_full
from .dsl.signature import MODULE_PREDICTORS
from .errors import (
    BackendUnavailable,
    DspexError,
    ResultLost,
    TaskTimeout,
    UnknownSignature,
    ValidationError,
    from_remote,
)
from .lost import PROBE_AFTER_S, PROBE_EVERY_S, LossProbe, LossWatch
from .programs.store import ProgramStore
from .sent_events import SentEvents
from .settings import Settings, load_settings

__all__ = ["Client", "Job", "JobEvents", "Result"]

_SIGNATURE_TTL_S = 5.0


@dataclass(frozen=True)
class Result:
    """A finished prediction."""

    outputs: dict[str, Any]
    session: str | None
    program: str
    program_version: int
    usage: dict[str, Any] = dc_field(default_factory=dict)
    lm: str = ""
    duration_ms: float = 0.0
    task_id: str | None = None
    worker: str | None = None
    #: With ``submit(..., trace=True)``: per predictor call, in order, ``{"predictor", "inputs", "outputs"}``.
    trace: list[dict[str, Any]] | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Result:
        return cls(outputs=data["outputs"], session=data.get("session"), program=data.get("program", ""),
                   program_version=int(data.get("program_version", 0)), usage=data.get("usage") or {},
                   lm=data.get("lm", ""), duration_ms=float(data.get("duration_ms", 0.0)),
                   task_id=data.get("task_id"), worker=data.get("worker"), trace=data.get("trace"))


def _raise_remote(exc: BaseException) -> None:
    """Re-raise a worker failure as the matching ``errors.*`` class."""
    if isinstance(exc, DspexError):
        raise exc
    raise from_remote(type(exc).__name__, getattr(exc, "args", (str(exc),))) from None


class Job:
    """A submitted task. ``state`` polls; ``get()`` waits for the :class:`Result`; ``events()`` follows it live;
    ``cancel()`` stops it."""

    def __init__(self, async_result: Any, *, probe: LossProbe | None = None, client: Client | None = None) -> None:
        self._r = async_result
        self._probe = probe
        self._client = client

    @property
    def id(self) -> str:
        return str(self._r.id)

    @property
    def state(self) -> str:
        return str(self._r.state)

    @property
    def info(self) -> Any:
        return self._r.info

    def ready(self) -> bool:
        return bool(self._r.ready())

    def get(self, timeout: float | None = 60.0) -> Result:
        """Wait for the result.

        Raises:
            TaskTimeout: nothing within ``timeout`` seconds.
            ResultLost: the task vanished with Redis's data (the server restarted without persistence while
                the task was queued): raised within a few seconds, not at the timeout.
            errors.*: the worker's failure, as its own class.
        """
        value = self.wait(timeout)
        state = self._r.state
        if state == "FAILURE" or isinstance(value, BaseException):
            _raise_remote(value if isinstance(value, BaseException) else DspexError(str(value)))
        if not isinstance(value, dict) or "outputs" not in value:
            raise ResultLost(f"job {self.id} finished ({state}) but its result is missing or expired")
        return Result.from_json(value)

    def wait(self, timeout: float | None = 60.0) -> Any:
        """Wait for the task to finish and return its raw result (a failure's exception is returned, not raised).

        Raises:
            TaskTimeout, ResultLost, BackendUnavailable: as :meth:`get`.
        """
        from celery.exceptions import TimeoutError as CeleryTimeout
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeout

        deadline = None if timeout is None else time.monotonic() + timeout
        wait = PROBE_AFTER_S
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            step = remaining if self._probe is None else (wait if remaining is None else min(wait, remaining))
            try:
                value = self._r.get(timeout=step, propagate=False, disable_sync_subtasks=False)
                break
            except CeleryTimeout:
                self._raise_if_lost(force=deadline is not None and time.monotonic() >= deadline)
                if deadline is not None and time.monotonic() >= deadline:
                    try:
                        state = self.state
                    except (RedisTimeout, RedisConnectionError, OSError):  # the pool's wait ran out, too
                        state = "unknown: result backend unavailable"
                    raise TaskTimeout(f"job {self.id} did not finish within {timeout} s (state {state})") from None
                wait = PROBE_EVERY_S
            except (RedisTimeout, RedisConnectionError, OSError, RuntimeError) as exc:
                # RuntimeError: Celery's result consumer gave up reconnecting. RedisConnectionError includes
                # MaxConnectionsError and a blocking pool's "No connection available" (DSPEX_REDIS_POOL_WAIT_S).
                self._raise_if_lost(force=True)
                raise BackendUnavailable(f"result backend unavailable while waiting for job {self.id}: {exc}") from None
        return value

    def _raise_if_lost(self, *, force: bool = False) -> None:
        if self._probe is not None and self._probe.lost(force=force):
            raise ResultLost(self._probe.message())

    def forget(self) -> None:
        self._r.forget()

    # -- live ---------------------------------------------------------------------------------------------
    def events(self, *, timeout: float | None = None, after: str = "0-0") -> JobEvents:
        """The job's live events (ARCHITECTURE 3.6), from the start (or after entry id ``after``) to its last.

        Iterate it (``for event in job.events()``) or, in asyncio code, ``async for event in job.events()``.
        Each event is a dict with ``"type"`` (``status``, ``step``, ``tool``, ``token``, then ``result`` or
        ``error``), ``"id"`` and ``"ts"``; see :mod:`dspex_tasks.live`. A job submitted without ``stream=True``
        (or whose stream expired) yields only its final event, once it has ended.

        Raises (while iterating):
            TaskTimeout: the job did not end within ``timeout`` seconds.
        """
        return JobEvents(self, timeout=timeout, after=after)

    def cancel(self, reason: str = "cancelled by request") -> bool:
        """Stop the job: a queued one ends when a worker takes it, a running one before its next LM call (or
        tool), as :class:`~dspex_tasks.errors.Cancelled`. Returns False when it had already finished."""
        client = self._need_client()
        if self._r.ready():
            return False
        live.request_cancel(client.redis, client.settings.namespace, self.id, ttl_s=client.settings.result_expires_s,
                            reason=reason)
        return True

    def final_event(self) -> dict[str, Any] | None:
        """The job's last event from its stored result (None while it runs)."""
        if not self._r.ready():
            return None
        value = self._r.get(timeout=1.0, propagate=False, disable_sync_subtasks=False)
        if self._r.state == "SUCCESS" and isinstance(value, dict):
            return {"type": "result", "result": value, "id": None, "ts": time.time()}
        error = value if isinstance(value, BaseException) else DspexError(str(value))
        remote = error if isinstance(error, DspexError) else \
            from_remote(type(error).__name__, getattr(error, "args", (str(error),)))
        return {"type": "error", "error": {"type": type(remote).__name__, "message": str(remote),
                                           "code": getattr(remote, "code", None)}, "id": None, "ts": time.time()}

    def _need_client(self) -> Client:
        if self._client is None:
            raise DspexError(f"job {self.id}: live events and cancel need the Client that made this handle")
        return self._client

    def __repr__(self) -> str:
        return f"Job({self.id!r})"


class JobEvents:
    """A job's events, iterable (``for``) and asynchronously iterable (``async for``)."""

    def __init__(self, job: Job, *, timeout: float | None, after: str) -> None:
        self.job = job
        self.timeout = timeout
        self.after = after

    def __iter__(self) -> Iterator[dict[str, Any]]:
        client = self.job._need_client()
        return live.read_events(client.redis, client.settings.namespace, self.job.id, after=self.after,
                                timeout_s=self.timeout, on_idle=self.job.final_event)

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        import asyncio

        from .connections import async_redis_client

        client = self.job._need_client()
        aredis = async_redis_client(client.settings)

        async def idle() -> dict[str, Any] | None:
            return await asyncio.to_thread(self.job.final_event)

        try:
            async for event in live.aread_events(aredis, client.settings.namespace, self.job.id, after=self.after,
                                                 timeout_s=self.timeout, on_idle=idle):
                yield event
        finally:
            await aredis.aclose()


class Client:
    """Enqueue DSPy programs from any Python service.

    Args:
        redis_url: defaults to ``DSPEX_REDIS_URL``.
        settings: a full settings object (overrides the URL arguments).
        app: an existing Celery app to send through.

    Example:
        >>> client = Client()  # doctest: +SKIP
        >>> client.submit("qa", {"question": "Why is the sky blue?"}, session="t42").get().outputs  # doctest: +SKIP
    """

    def __init__(self, *, redis_url: str | None = None, broker_url: str | None = None,
                 result_backend: str | None = None, namespace: str | None = None,
                 settings: Settings | None = None, app: Any = None) -> None:
        overrides = {k: v for k, v in {"redis_url": redis_url, "broker_url": broker_url,
                                       "result_backend": result_backend, "namespace": namespace}.items() if v}
        self.settings = settings or load_settings(**overrides)
        if app is None:
            from .app import create_app

            app = create_app(self.settings)
        self.app = app
        self._redis: Any = None
        self._loss = LossWatch(self.settings, app)
        self._sent_events = SentEvents(app)  # task-sent events in batches, off the submit path
        self._programs: ProgramStore | None = None
        self._sigs: dict[str, dict[str, Any]] = {}
        self._validators: dict[str, Any] = {}
        self._loaded_at = 0.0
        self._lock = threading.Lock()

    # -- connections ----------------------------------------------------------
    @property
    def redis(self) -> Any:
        if self._redis is None:
            self._redis = redis_client(self.settings)
        return self._redis

    @property
    def programs(self) -> ProgramStore:
        """The session program store."""
        if self._programs is None:
            self._programs = ProgramStore(redis=self.redis, namespace=self.settings.namespace,
                                          session_ttl_s=self.settings.session_ttl_s,
                                          max_state_bytes=self.settings.max_state_bytes,
                                          signatures=self._published_predictors)
        return self._programs

    def _published_predictors(self, name: str) -> list[str] | None:
        """The predictors workers published for signature or program ``name`` (a state must fit them), or None."""
        published = self.signatures().get(name) or self.signatures(refresh=True).get(name)
        predictors = (published or {}).get("predictors")
        if predictors is None and published and published.get("module") in MODULE_PREDICTORS:  # older workers
            predictors = MODULE_PREDICTORS[published["module"]]
        return list(predictors) if predictors is not None else None

    @property
    def datasets(self) -> Any:
        """Named datasets (:class:`~dspex_tasks.optimize.datasets.DatasetStore`)."""
        from .optimize.datasets import DatasetStore

        return DatasetStore(redis=self.redis, namespace=self.settings.namespace)

    @property
    def runs(self) -> Any:
        """Optimization runs (:class:`~dspex_tasks.optimize.runs.RunStore`)."""
        from .optimize.runs import RunStore

        return RunStore(redis=self.redis, namespace=self.settings.namespace)

    def run(self, run_id: str) -> Any:
        """A handle on an earlier optimization run."""
        from .optimize.runs import OptimizationRun

        self.runs.get(run_id)
        return OptimizationRun(run_id, self.runs)

    def capabilities(self) -> dict[str, Any]:
        """What workers offer: ``metrics`` and ``optimizers`` (names), ``optimizer_params`` (name -> JSON Schema)."""
        raw = self.redis.hgetall(keys.capabilities(self.settings.namespace))
        return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}

    def optimize(self, signature: str, trainset: list[dict[str, Any]] | None = None,
                 valset: list[dict[str, Any]] | None = None, *, metric: str = "exact_match",
                 optimizer: str = "bootstrap_few_shot", session: str | None = None, program: str | None = None,
                 params: dict[str, Any] | None = None, dataset: str | None = None,
                 scheduled: bool = False) -> Any:
        """Start an optimization run (section 3.4); returns an :class:`OptimizationRun`.

        Rows are validated against the signature (inputs only; every other field is a label the
        metric sees), the
        metric and optimizer names against what workers publish, and ``params`` against the
        optimizer's published params schema (its own keys plus the common ``min_gain``,
        ``val_fraction``, ``eval_chunk_size``, ``seed``, ``num_threads``), before anything is
        enqueued: a bad or unknown key raises ``ValidationError`` naming ``params.<key>``. (With
        no worker published yet, built-in optimizers' params are checked against their own
        models; a user-registered optimizer's are checked by the worker, failing the run.) A
        stored ``dataset`` is read and checked here too.
        Without a valset, ``params["val_fraction"]`` of the trainset is held out.

        With a ``session``, the candidate becomes the session's new program version when it
        beats the current one by ``params["min_gain"]``. Without one the run is a dry run: it
        compiles and evaluates the candidate against the base program and promotes nothing
        (``summary["dry_run"]`` is True, ``summary["promoted"]`` False); ``run.candidate()``
        returns the candidate's state, to store with
        ``client.programs.put(session, program, run.candidate())``.
        """
        from .optimize.datasets import validate_rows
        from .optimize.runs import OptimizationRun

        if session is not None:
            keys.check_id(session, "session")
        program = keys.check_id(program, "program") if program else signature
        wire.check_json(params, "params", what="optimization")  # rows: validate_rows checks them
        self._validator(signature)
        desc = self._sigs[signature]
        if trainset is not None and dataset is not None:
            raise ValidationError.from_errors("optimization", [{"field": "dataset", "message": "give a trainset or a dataset, not both"}])
        if trainset is None and dataset is None:
            raise ValidationError.from_errors("optimization", [{"field": "trainset", "message": "give a trainset or a dataset"}])
        if trainset is not None:
            trainset = validate_rows(trainset, desc, what="trainset")
        else:  # a stored dataset's rows are checked here too, so a bad one fails now rather than at run.get()
            validate_rows(self.datasets.get(str(dataset)), desc, what="dataset")
        if valset is not None:
            valset = validate_rows(valset, desc, what="valset")
        caps = self.capabilities()
        for field, name in (("metric", metric), ("optimizer", optimizer)):
            known = caps.get(f"{field}s")
            if known is not None and name not in known:
                raise ValidationError.from_errors("optimization", [
                    {"field": field, "message": f"unknown {field} '{name}'; known: {', '.join(known)}"}])
        if params is not None and not isinstance(params, dict):
            raise ValidationError.from_errors("optimization", [{"field": "params", "message": "expected an object"}])
        _check_params(params or {}, optimizer, caps)
        from .optimize.runs import start_run

        spec = {"signature": signature, "session": session, "program": program, "metric": metric,
                "optimizer": optimizer, "params": params or {}, "dataset": dataset, "scheduled": scheduled}
        with typed_store_full(self.settings.broker):  # a full Redis: errors.StoreFull, not a raw Redis error
            run_id = start_run(self.app, self.runs, spec, trainset=trainset, valset=valset,
                               queue=self.settings.optimize_queue)
        return OptimizationRun(run_id, self.runs)

    def release_results(self, extra: Iterable[Any] = ()) -> None:
        """Stop waiting for results nobody collected (the pending ones, and ``extra`` AsyncResults).

        Closing the result subscription connection drops every subscription at once; Celery would otherwise
        unsubscribe each result with a round trip of its own (thousands after an interrupted bulk submit),
        or at garbage collection, after Redis may be gone.
        """
        backend = self.app.backend
        consumer = getattr(backend, "result_consumer", None)
        with contextlib.suppress(Exception):
            if consumer is not None:
                consumer.stop()
        subscribed = getattr(consumer, "subscribed_to", None)
        if isinstance(subscribed, set):
            subscribed.clear()  # nothing left to unsubscribe one by one
        pending = [result for mapping in getattr(backend, "_pending_results", ())
                   for waiters in list(mapping.values()) for result in list(waiters.values())]
        for result in [*pending, *extra]:
            with contextlib.suppress(Exception):
                backend.remove_pending_result(result)

    def close(self) -> None:
        """Release connections and the result subscriptions of jobs never collected.

        Otherwise each uncollected result unsubscribes when garbage-collected, possibly
        after Redis is gone, and Celery retries for seconds at interpreter exit.
        """
        self.release_results()
        self._sent_events.close()
        if self._redis is not None:
            self._redis.close()
        self._loss.close()
        self.app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- signatures -----------------------------------------------------------
    def signatures(self, *, refresh: bool = False) -> dict[str, dict[str, Any]]:
        """Published signatures: name -> {input_schema, output_schema, module, ...}."""
        if refresh or time.monotonic() - self._loaded_at > _SIGNATURE_TTL_S:
            raw = self.redis.hgetall(keys.signatures(self.settings.namespace))
            sigs = {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}
            with self._lock:
                if sigs != self._sigs:
                    self._validators = {}
                self._sigs = sigs
                self._loaded_at = time.monotonic()
        return dict(self._sigs)

    def _validator(self, name: str) -> Any:
        sigs = self.signatures()
        if name not in sigs:
            sigs = self.signatures(refresh=True)
        if name not in sigs:
            known = ", ".join(sorted(sigs)) or "none (is a worker running?)"
            raise UnknownSignature(f"unknown signature '{name}' (published: {known})")
        v = self._validators.get(name)
        if v is None:
            from jsonschema import Draft202012Validator

            v = self._validators[name] = Draft202012Validator(sigs[name]["input_schema"])
        return v

    def validate(self, name: str, inputs: Any) -> None:
        """Check ``inputs`` against the published input schema.

        Raises:
            UnknownSignature, ValidationError: nothing is enqueued.
        """
        validator = self._validator(name)
        problems = sorted(validator.iter_errors(inputs), key=lambda e: list(e.absolute_path))
        if problems:
            errors = [{"field": ".".join(str(p) for p in e.absolute_path) or _root_field(e), "message": e.message}
                      for e in problems]
            raise ValidationError.from_errors(f"inputs for '{name}'", errors)
        size = len(json.dumps(inputs, separators=(",", ":")))
        if size > self.settings.max_payload_bytes:
            raise ValidationError.from_errors("payload", [{
                "field": "inputs", "message": f"{size} bytes exceeds the {self.settings.max_payload_bytes}-byte limit"}])

    # -- submitting -----------------------------------------------------------
    def submit(self, name: str, inputs: dict[str, Any], *, session: str | None = None, program: str | None = None,
               trace: bool = False, lm_config: dict[str, Any] | None = None, countdown: float | None = None,
               queue: str | None = None, stream: bool = False, timeout_s: float | None = None) -> Job:
        """Validate and enqueue one prediction of signature ``name``.

        Args:
            trace: The result carries ``trace``: per predictor call, in order, its name (as in the module's
                ``named_predictors()``), inputs and outputs (ChainOfThought's ``reasoning``, ReAct's trajectory).
            lm_config: LM settings for every LM call of this job: ``temperature``, ``top_p``, ``max_tokens``,
                ``n``, ``rollout_id``; any other key (``api_base``, ``model``, ...) is a ``ValidationError``.
            stream: The job publishes live events (tokens, steps, tool calls): follow them with
                ``job.events()``. Jobs without it pay nothing for them.
            timeout_s: The job's total time from now: past it, it stops before its next LM call and ends as
                ``errors.Cancelled`` (queued time counts).

        Raises:
            StoreFull: Redis is full (its ``maxmemory``): nothing was enqueued.

        Example:
            >>> client.submit("qa", {"question": "Why?"}, trace=True, lm_config={"temperature": 0.3})  # doctest: +SKIP
        """
        if session is not None:
            keys.check_id(session, "session")
        if program is not None:
            keys.check_id(program, "program")
        _check_countdown(countdown)
        options = wire.request_options(trace=trace, lm_config=lm_config, stream=stream, timeout_s=timeout_s)
        wire.check_json(inputs, "inputs")
        inputs = wire.json_numbers(inputs)
        self.validate(name, inputs)
        run_id = self._loss.run_id()
        queue = queue or self.settings.predict_queue
        with typed_store_full(self.settings.broker):  # a full Redis: errors.StoreFull, nothing enqueued
            r = self.app.send_task(wire.task_name(name), event_dispatcher=self._sent_events,
                                   kwargs=wire.predict_kwargs(inputs, session, program, options),
                                   queue=queue, countdown=countdown,
                                   headers=wire.sent_headers())  # queue age for `dspex health`
        return Job(r, probe=self._loss.probe(str(r.id), queue, run_id), client=self)

    def job(self, job_id: str, *, queue: str | None = None) -> Job:
        """A handle on an earlier job by id (sent to ``queue``, default the predict queue).

        Its ``get()`` reports the job lost (:class:`~dspex_tasks.errors.ResultLost`) if Redis loses its data from
        now on; a loss before this call is not known to it and ends in a timeout.
        """
        queue = queue or self.settings.predict_queue
        keys.check_id(job_id, "job")
        return Job(self.app.AsyncResult(job_id), probe=self._loss.probe(job_id, queue, self._loss.run_id()),
                   client=self)

    def map(self, name: str, inputs: Iterable[dict[str, Any]], *, session: str | None = None,
            program: str | None = None, trace: bool = False, lm_config: dict[str, Any] | None = None,
            chunk_size: int | None = None, timeout: float | None = 300.0,
            return_exceptions: bool = False, on_progress: Any = None) -> list[Result | DspexError]:
        """Run many inputs in few messages; results come back in input order.

        Every input is validated before anything is sent. With
        ``return_exceptions`` a failed item is returned as its error in place;
        otherwise the first failure is raised after all chunks finished.
        ``trace`` and ``lm_config`` apply to every item, as in :meth:`submit`.
        """
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValidationError.from_errors("map", [{"field": "chunk_size",
                                                       "message": f"expected an integer >= 1, got {chunk_size!r}"}])
        items = list(inputs)
        for i, item in enumerate(items):
            wire.check_json(item, str(i), what=f"inputs for '{name}' (item {i})")
        items = [wire.json_numbers(item) for item in items]
        if session is not None:
            keys.check_id(session, "session")
        options = wire.request_options(trace=trace, lm_config=lm_config)
        for i, item in enumerate(items):
            try:
                self.validate(name, item)
            except ValidationError as exc:
                errors = [{"field": f"{i}.{e['field']}".rstrip("."), "message": e["message"]} for e in exc.errors]
                raise ValidationError.from_errors(f"inputs for '{name}' (item {i})", errors) from None
        size = chunk_size or self.settings.map_chunk_size
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        run_id, queue = self._loss.run_id(), self.settings.predict_queue
        with typed_store_full(self.settings.broker):  # chunks sent before Redis filled up still run
            pending = [self.app.send_task(wire.MAP_TASK, event_dispatcher=self._sent_events,
                                          kwargs=wire.map_kwargs(name, chunk, session, program, options),
                                          queue=queue, headers=wire.sent_headers())
                       for chunk in chunks]
        pending = [Job(r, probe=self._loss.probe(str(r.id), queue, run_id)) for r in pending]
        return self._collect(pending, [len(c) for c in chunks], timeout, return_exceptions, on_progress)

    def _collect(self, pending: Sequence[Any], sizes: list[int], timeout: float | None, return_exceptions: bool,
                 on_progress: Any) -> list[Result | DspexError]:
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[Result | DspexError] = []
        for job, n in zip(pending, sizes, strict=True):
            remaining = None if deadline is None else max(0.01, deadline - time.monotonic())
            try:
                payload = job.wait(remaining)  # a chunk lost with Redis's data: ResultLost within seconds
            except TaskTimeout:
                raise TaskTimeout(f"map chunk {job.id} did not finish within {timeout} s") from None
            if isinstance(payload, BaseException) or job.state == "FAILURE":
                err = from_remote(type(payload).__name__, getattr(payload, "args", (str(payload),)))
                out.extend([err] * n)
            else:
                for item in payload["results"]:
                    if "error" in item:
                        out.append(from_remote(item["error"]["type"], item["error"]["args"]))
                    else:
                        out.append(Result.from_json(item))
            if on_progress is not None:
                on_progress(n)
        if not return_exceptions:
            for item in out:
                if isinstance(item, DspexError):
                    raise item
        return out


#: The longest ``countdown`` submit accepts (a later start belongs to a schedule).
MAX_COUNTDOWN_S = 30 * 86400


def _check_countdown(countdown: Any) -> None:
    if countdown is None:
        return
    ok = isinstance(countdown, int | float) and not isinstance(countdown, bool) and math.isfinite(countdown)
    if not ok or not 0 <= countdown <= MAX_COUNTDOWN_S:
        raise ValidationError.from_errors("submit", [{"field": "countdown", "message": (
            f"expected a finite number of seconds in 0..{MAX_COUNTDOWN_S}, got {countdown!r}")}])


def _check_params(params: dict[str, Any], optimizer: str, caps: dict[str, Any]) -> None:
    """``params`` against the schema workers publish for ``optimizer``, else against the built-in optimizer's
    own pydantic model (dspy-free), so a bad key fails here even before any worker has started."""
    from .optimize.params import check_params

    schemas = caps.get("optimizer_params")
    schema = schemas.get(optimizer) if isinstance(schemas, dict) else None
    if schema:
        check_params(params, optimizer, schema)
        return
    from .optimize.optimizers import builtin_optimizer, parse_common

    opt = builtin_optimizer(optimizer)
    if opt is not None:  # a user's optimizer lives on the workers: they check it when none is published
        parse_common(params)
        opt.parse_params(params)


def _root_field(err: Any) -> str:
    # jsonschema reports missing/extra properties at the parent; name the field itself.
    if err.validator == "required" and isinstance(err.instance, dict):
        missing = [p for p in err.validator_value if p not in err.instance]
        return ".".join(str(p) for p in err.absolute_path) or (missing[0] if missing else "")
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = set(err.schema.get("properties", {}))
        extra = [p for p in err.instance if p not in allowed]
        return extra[0] if extra else ""
    return ""
