"""Async access to job results: read a job's state, wait for it, follow its state changes.

Celery's Redis result backend stores each result under ``backend.get_key_for_task(id)`` and PUBLISHes the
same payload on a channel of that name. One pub/sub connection per gateway process (the :class:`Hub`)
subscribes per waiting job and fans messages out to asyncio queues, so thousands of waiting requests
cost no threads and no polling; a slow poll (every second) covers a message lost to a reconnect.

Jobs submitted through the gateway (API or console) are also indexed by submit time, fleet-wide and per API
key, so :meth:`JobReader.recent` can list them; ``Client.submit`` indexes nothing (one broker round trip).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypedDict

from .. import errors, keys

__all__ = ["MAX_INDEXED", "Hub", "JobReader", "JobSummary", "READY", "job_error"]

log = logging.getLogger(__name__)

READY = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
_POLL_S = 1.0
#: The most job ids each index (fleet, per key) keeps: the newest; older ones drop out of the lists (their
#: records and results stay readable by id until they expire).
MAX_INDEXED = 10_000
#: A filtered list reads at most this many times ``limit`` of the newest ids: a recent view, not a search.
_SCAN_FACTOR = 10
_MIN_PAGE = 100


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Hub:
    """One pub/sub connection: fixed channels with callbacks, and per-call temporary subscriptions."""

    def __init__(self, aredis: Any) -> None:
        self._redis = aredis
        self._pubsub: Any = None
        self._queues: dict[str, set[asyncio.Queue[bytes]]] = {}
        self._callbacks: dict[str, Callable[[bytes], Awaitable[None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._confirm: dict[str, asyncio.Future[None]] = {}

    async def start(self, fixed: dict[str, Callable[[bytes], Awaitable[None]]]) -> None:
        self._callbacks = dict(fixed)
        self._pubsub = self._redis.pubsub()
        await self._pubsub.subscribe(*self._callbacks)
        self._task = asyncio.get_running_loop().create_task(self._read(), name="dspex-gateway-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()

    async def _read(self) -> None:
        while True:
            try:
                msg = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a reconnect re-subscribes every channel (redis-py on_connect)
                log.warning("gateway pub/sub read failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            if msg and msg.get("type") == "subscribe":  # the server has the subscription from here on
                confirmed = self._confirm.pop(_s(msg["channel"]), None)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)
            if not msg or msg.get("type") != "message":
                continue
            channel, data = _s(msg["channel"]), msg["data"]
            callback = self._callbacks.get(channel)
            if callback is not None:
                try:
                    await callback(data)
                except Exception:
                    log.exception("gateway callback for %s failed", channel)
            for q in list(self._queues.get(channel, ())):
                q.put_nowait(data)

    @contextlib.asynccontextmanager
    async def listen(self, channel: str) -> AsyncIterator[asyncio.Queue[bytes]]:
        """Messages on ``channel`` while the block runs (subscribed, as confirmed by the server, on entry)."""
        q: asyncio.Queue[bytes] = asyncio.Queue()
        async with self._lock:
            first = channel not in self._queues
            self._queues.setdefault(channel, set()).add(q)
            if first and self._pubsub is not None:
                self._confirm[channel] = asyncio.get_running_loop().create_future()
                await self._pubsub.subscribe(channel)
            confirmed = self._confirm.get(channel)  # also when another listener's SUBSCRIBE is still on its way
        if confirmed is not None:  # else a PUBLISH racing the SUBSCRIBE could be missed until the next poll
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(confirmed), _POLL_S)
        try:
            yield q
        finally:
            async with self._lock:
                waiting = self._queues.get(channel)
                if waiting is not None:
                    waiting.discard(q)
                    if not waiting:
                        del self._queues[channel]
                        if self._pubsub is not None:
                            with contextlib.suppress(Exception):
                                await self._pubsub.unsubscribe(channel)


def job_error(meta: dict[str, Any]) -> errors.DspexError:
    """A failed job's error as its ``errors.*`` class (from the stored, undecoded exception)."""
    raw = meta.get("result")
    if isinstance(raw, dict) and "exc_type" in raw:
        args = raw.get("exc_message")
        return errors.from_remote(str(raw["exc_type"]), args if isinstance(args, (list, tuple)) else [str(args)])
    return errors.DspexError(f"job ended in state {meta.get('status')}")


class JobSummary(TypedDict):
    """One row of a list of recent jobs (its result stays at ``GET /v1/jobs/{id}``)."""

    id: str
    signature: str
    session: str | None
    created_at: float
    state: str


class JobReader:
    """Job state and results for the gateway (needs a Redis result backend)."""

    def __init__(self, *, celery_app: Any, aredis: Any, hub: Hub, namespace: str, record_ttl_s: int) -> None:
        from celery.backends.redis import RedisBackend

        backend = celery_app.backend
        if not isinstance(backend, RedisBackend):  # subclasses too (the worker's StoreFullBackend is one)
            raise errors.ConfigurationError("the HTTP gateway needs a Redis result backend "
                                            f"(DSPEX_RESULT_BACKEND), got {type(backend).__name__}")
        self._backend = backend
        self._redis = aredis
        self._hub = hub
        self._ns = namespace
        self._ttl = record_ttl_s

    def _key(self, job_id: str) -> str:
        return _s(self._backend.get_key_for_task(job_id))

    async def record(self, job_id: str, signature: str, key_id: str, session: str | None = None) -> None:
        """Who submitted a job through the gateway (its owner scope, checked when it is read), for as long as
        its result is kept."""
        now = time.time()
        value = json.dumps({"signature": signature, "key": key_id, "session": session, "created_at": now})
        pipe = self._redis.pipeline(transaction=False)  # one round trip: the record and both indexes
        pipe.set(keys.gateway_job(self._ns, job_id), value, ex=self._ttl)
        for index in (keys.gateway_jobs(self._ns), keys.gateway_key_jobs(self._ns, key_id)):
            pipe.zadd(index, {job_id: now})
            # bounded as the records are: nothing older than their TTL, at most MAX_INDEXED ids
            pipe.zremrangebyscore(index, "-inf", f"({now - self._ttl}")
            pipe.zremrangebyrank(index, 0, -MAX_INDEXED - 1)
            pipe.expire(index, self._ttl)
        await pipe.execute()

    async def recent(self, key_id: str | None, *, limit: int, session: str | None = None,
                     signature: str | None = None,
                     visible: Callable[[dict[str, Any]], bool] | None = None) -> list[JobSummary]:
        """The newest ``limit`` jobs one API key submitted (``key_id``; None: every key's, for admin), newest
        first, each with its current state (PENDING until a worker reports one).

        ``session`` and ``signature`` keep only matching jobs, and ``visible`` (a test of the job's gateway
        record, e.g. the caller's scope) only those it passes; a filtered list reads at most
        ``10 * limit`` of the newest ids, so it may come back short though older matches exist. A job whose
        record expired is left out.
        """
        if limit < 1:
            return []
        index = keys.gateway_jobs(self._ns) if key_id is None else keys.gateway_key_jobs(self._ns, key_id)
        filtered = session is not None or signature is not None or visible is not None
        bound = min(limit * _SCAN_FACTOR if filtered else limit, MAX_INDEXED)
        page = max(limit, _MIN_PAGE) if filtered else limit
        out: list[JobSummary] = []
        for start in range(0, bound, page):
            ids = [_s(i) for i in await self._redis.zrevrange(index, start, min(start + page, bound) - 1)]
            if not ids:
                break
            pipe = self._redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.get(keys.gateway_job(self._ns, job_id))
                pipe.get(self._key(job_id))
            replies = await pipe.execute()
            for job_id, rec_raw, meta_raw in zip(ids, replies[0::2], replies[1::2], strict=True):
                if rec_raw is None:  # expired (the index is trimmed only when a job is recorded)
                    continue
                rec = json.loads(rec_raw)
                if ((session is not None and rec.get("session") != session)
                        or (signature is not None and rec.get("signature") != signature)
                        or (visible is not None and not visible(rec))):
                    continue
                meta = self._decode(meta_raw)  # decoded only for the rows kept: a result can be large
                out.append(JobSummary(id=job_id, signature=str(rec["signature"]), session=rec.get("session"),
                                      created_at=float(rec["created_at"]),
                                      state=str(meta.get("status") or "PENDING") if meta else "PENDING"))
                if len(out) == limit:
                    return out
            if len(ids) < page:
                break
        return out

    def _decode(self, raw: Any) -> dict[str, Any] | None:
        if raw is None:
            return None
        meta = self._backend.decode(raw)
        return meta if isinstance(meta, dict) else None

    async def lookup(self, job_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(gateway record, result meta); both None for a job nobody knows."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(keys.gateway_job(self._ns, job_id))
        pipe.get(self._key(job_id))
        rec_raw, meta_raw = await pipe.execute()
        return (json.loads(rec_raw) if rec_raw else None), self._decode(meta_raw)

    async def meta(self, job_id: str) -> dict[str, Any] | None:
        return self._decode(await self._redis.get(self._key(job_id)))

    async def follow(self, job_id: str, timeout_s: float | None = None,
                     ticks: bool = False) -> AsyncIterator[dict[str, Any] | None]:
        """The current meta (None while pending), then each change, until ready or ``timeout_s`` passed.

        With ``ticks``, also the unchanged meta about once a second (for keepalives).
        """
        channel = self._key(job_id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        async with self._hub.listen(channel) as q:
            meta = await self.meta(job_id)
            last = None if meta is None else meta.get("status")
            yield meta
            while meta is None or meta.get("status") not in READY:
                wait = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
                if wait <= 0:
                    return
                try:
                    raw = await asyncio.wait_for(q.get(), wait)
                    fresh = self._decode(raw)
                except TimeoutError:
                    fresh = await self.meta(job_id)
                if fresh is not None and fresh.get("status") != last:
                    meta, last = fresh, fresh.get("status")
                    yield meta
                elif ticks:
                    yield meta

    async def wait(self, job_id: str, timeout_s: float) -> dict[str, Any] | None:
        """The meta once ready, or the latest (possibly None) when ``timeout_s`` passed."""
        latest = None
        async for meta in self.follow(job_id, timeout_s):
            latest = meta
        return latest
