"""The gateway's state object (:class:`Gateway`): settings, the client, async Redis, the published signatures.

Kept apart from :mod:`.app` so the routers and the middleware can name it without importing the app
factory (which imports them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .. import keys, wire
from ..client import Client
from ..connections import async_redis_client
from ..errors import ProgramNotFound, UnknownSignature, ValidationError, from_remote
from ..settings import Settings
from .auth import RequestLimiter, legacy_key_ids
from .openapi import build_document
from .problems import Problem, status_for
from .results import READY, Hub, JobReader, job_error

__all__ = ["Gateway"]

log = logging.getLogger(__name__)

REFRESH_S = 30.0
SENDERS = 2  # threads that send to the broker (see Gateway.enqueue)
_UNKNOWN_RELOAD_S = 0.5


class Gateway:
    """The gateway's state: settings, the (sync) client, async Redis, the signature set, the job reader."""

    def __init__(self, settings: Settings, client: Client) -> None:
        self.settings = settings
        self.client = client
        self.limiter = RequestLimiter(namespace=settings.namespace, default_rate_per_min=settings.gateway_rate_per_min)
        self.signatures: dict[str, dict[str, Any]] = {}
        self.capabilities: dict[str, list[str]] = {}
        self.version = 0
        self.aredis: Any = None
        self.hub: Hub | None = None
        self._jobs: JobReader | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start_lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._loaded_at = 0.0
        self._refresh: asyncio.Task[Any] | None = None
        self._doc: dict[str, Any] | None = None
        self._doc_version = -1
        self._senders = ThreadPoolExecutor(max_workers=SENDERS, thread_name_prefix="dspex-gateway-send")
        #: ``(METHOD, path template) -> right`` of every non-public route (set by the app factory)
        self.route_rights: dict[tuple[str, str], str] = {}
        self._legacy_checked = False

    @property
    def jobs(self) -> JobReader:
        assert self._jobs is not None, "the gateway has not started"
        return self._jobs

    # -- lifecycle --------------------------------------------------------------------
    async def ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            if time.monotonic() - self._loaded_at > REFRESH_S and (self._refresh is None or self._refresh.done()):
                self._refresh = loop.create_task(self.reload())
            return
        if self._start_lock is None or self._lock_loop is not loop:
            self._start_lock, self._lock_loop = asyncio.Lock(), loop
        async with self._start_lock:
            if self._loop is not loop:
                await self._start(loop)

    async def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        # a different loop (a test client without a lifespan) starts afresh; the old one is gone
        self.aredis = async_redis_client(self.settings)
        self.hub = Hub(self.aredis)
        self._jobs = JobReader(celery_app=self.client.app, aredis=self.aredis, hub=self.hub,
                               namespace=self.settings.namespace, record_ttl_s=self.settings.result_expires_s)
        try:
            await self.reload()
            await self.hub.start({keys.signature_events(self.settings.namespace): self._on_publish})
        except BaseException:  # Redis not there yet: the next request tries again
            await self.stop()
            raise
        self._loop = loop
        if not self._legacy_checked and self.settings.gateway_auth:
            self._legacy_checked = True
            await self._warn_legacy_keys()

    async def _warn_legacy_keys(self) -> None:
        """One warning per gateway: keys stored before scopes keep full access until they are replaced."""
        legacy = legacy_key_ids(await self.aredis.hvals(keys.gateway_api_keys(self.settings.namespace)))
        if legacy:
            log.warning("%d legacy API key(s) stored before key scopes keep full access (admin, every session): "
                        "%s; replace each with a scoped key (dspex keys create --name NAME --sessions ... --rights "
                        "...) and revoke it (dspex keys revoke ID)", len(legacy), ", ".join(legacy))

    async def stop(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        if self.hub is not None:
            await self.hub.stop()
        if self.aredis is not None:
            with contextlib.suppress(Exception):
                await self.aredis.aclose()
        self._loop = None

    # -- signatures ----------------------------------------------------------------------
    async def _on_publish(self, _data: bytes) -> None:
        await self.reload()

    async def reload(self) -> bool:
        """Re-read the published signatures; True when the set changed."""
        pipe = self.aredis.pipeline(transaction=False)
        pipe.hgetall(keys.signatures(self.settings.namespace))
        pipe.hgetall(keys.capabilities(self.settings.namespace))
        raw, raw_caps = await pipe.execute()
        sigs = {(k.decode() if isinstance(k, bytes) else str(k)): json.loads(v) for k, v in raw.items()}
        caps = {(k.decode() if isinstance(k, bytes) else str(k)): json.loads(v) for k, v in raw_caps.items()}
        self._loaded_at = time.monotonic()
        if sigs == self.signatures and caps == self.capabilities:
            return False
        self.signatures, self.capabilities = sigs, caps
        self.version += 1
        log.info("gateway serves signatures: %s", ", ".join(sorted(sigs)) or "none")
        return True

    async def signature(self, name: str) -> dict[str, Any]:
        desc = self.signatures.get(name)
        if desc is None and time.monotonic() - self._loaded_at > _UNKNOWN_RELOAD_S:
            await self.reload()
            desc = self.signatures.get(name)
        if desc is None:
            known = ", ".join(sorted(self.signatures)) or "none (is a worker running?)"
            raise UnknownSignature(f"unknown signature '{name}' (published: {known})")
        return desc

    def check_program(self, name: str, session: str, program: str) -> None:
        """409 when the named program serves another signature (checked before anything is enqueued)."""
        try:
            serves = self.client.programs.get(session, program).signature or program
        except ProgramNotFound:
            serves = program
        if serves != name:
            raise Problem(409, ValidationError.code, f"program '{program}' in session '{session}' serves signature "
                          f"'{serves}', not '{name}'", errors=[{"field": "program", "pointer": "/program",
                                                               "message": f"serves signature '{serves}'"}])

    # -- jobs ----------------------------------------------------------------------------
    async def enqueue(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a (blocking) send in the gateway's small sender pool, off the event loop.

        Two threads on purpose: Celery serializes sends on a process-wide lock (its event dispatcher), so
        more threads only queue on it and on the GIL (measured: 40 threads ~230 submits/s, 4 ~330, 1-2
        ~380 on 2 cores), while a second one keeps sending when the first waits on a slow write.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._senders, functools.partial(fn, *args, **kwargs))

    @staticmethod
    def job_view(job_id: str, record: dict[str, Any] | None, meta: dict[str, Any] | None) -> dict[str, Any]:
        """A job as the API shows it: id, signature, state, and the result or the error once ready."""
        signature = (record or {}).get("signature")
        if signature is None and meta:
            signature = wire.program_of(str(meta.get("name") or ""))
        state = str(meta.get("status", "PENDING")) if meta else "PENDING"
        view: dict[str, Any] = {"id": job_id, "signature": signature, "state": state}
        if meta and state == "SUCCESS" and isinstance(meta.get("result"), dict) and "outputs" in meta["result"]:
            view["result"] = meta["result"]
        elif meta and state in READY and state != "SUCCESS":
            err = job_error(meta)
            view["error"] = {"type": type(err).__name__, "code": err.code, "message": err.message}
            if getattr(err, "errors", None):
                view["error"]["errors"] = err.errors  # type: ignore[attr-defined]
        return view

    @staticmethod
    def failure_status(view: dict[str, Any]) -> int:
        """A failed job's status: the error's own for client errors; 409 when the named program serves
        another signature (the stored state conflicts, not the request's shape); 502 for the rest."""
        err = view["error"]
        if err["code"] == "validation_error" and {e.get("field") for e in err.get("errors", [])} == {"program"}:
            return 409
        status = status_for(from_remote(err["type"], [err["message"]]))
        return status if status < 500 or status == 504 else 502

    # -- OpenAPI ---------------------------------------------------------------------------
    def openapi(self, app: FastAPI) -> dict[str, Any]:
        if self._doc is None or self._doc_version != self.version:
            base = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            self._doc = build_document(base, self.signatures, self.capabilities, self.route_rights)
            self._doc_version = self.version
        return self._doc
