"""The HTTP gateway: ``create_gateway(settings=None, client=None) -> FastAPI``.

It needs no signature code and no dspy: like :class:`~dspex_tasks.client.Client`, it reads the schemas
workers publish to Redis. Per-signature operations are served by parameterized routes that validate
against the published schema, and described one by one in the OpenAPI document (regenerated when the
published set changes), so ``/v1/signatures/qa/jobs`` documents ``question: string``. A signature published
after startup appears within a moment: the gateway subscribes to ``keys.signature_events`` and also
re-reads the published hash every 30 seconds and whenever a request names a signature it does not know.

Every route but the public ones (``/healthz``, the OpenAPI document and docs) declares the right it needs
(:mod:`.routers.access`); the app refuses to be built, or to start, with a route that declares none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from ..client import Client
from ..settings import Settings, load_settings
from .console import mount_console
from .metrics import MetricsMiddleware
from .middleware import GatewayMiddleware
from .problems import install_handlers
from .routers import jobs, meta, optimizations, programs, signatures
from .routers.access import check_routes
from .state import Gateway

__all__ = ["Gateway", "create_gateway"]

log = logging.getLogger(__name__)


def create_gateway(settings: Settings | None = None, client: Client | None = None) -> FastAPI:
    """The gateway app (run it with uvicorn, or ``dspex gateway``)."""
    settings = settings or (client.settings if client is not None else load_settings())
    owns_client = client is None
    if client is None:
        client = Client(settings=settings)
        # The gateway waits on results itself (results.Hub), so Celery's SUBSCRIBE per sent task (and the
        # UNSUBSCRIBE when the AsyncResult is dropped) is pure cost. A later .get() still subscribes and then
        # reads the stored result, so nothing is lost.
        client.app.backend.on_task_call = lambda *_args, **_kwargs: None
    gw = Gateway(settings, client)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        from ..worker.startup import RedisUnreachable, preflight

        gw.route_rights = check_routes(_app)  # routes added after create_gateway are checked too
        try:  # a gateway that cannot reach Redis at start stops here (later outages are served as 503s)
            await asyncio.to_thread(preflight, settings, what="gateway")
        except RedisUnreachable as exc:
            log.critical("refusing to start: %s", exc)
            raise
        await gw.ensure_started()
        try:
            yield
        finally:
            await gw.stop()
            if owns_client:
                gw.client.close()

    app = FastAPI(
        title="dspex-tasks gateway", version="1", lifespan=lifespan,
        generate_unique_id_function=lambda route: str(route.name),
        description="DSPy signatures as typed jobs. Every published signature has its own typed operations "
                    "under /v1/signatures/{name}. Errors are RFC 9457 problem details.",
    )
    app.state.gateway = gw
    install_handlers(app)
    # in this order: routes match in registration order
    for router in (meta.router, signatures.router, jobs.router, programs.router, optimizations.router):
        app.include_router(router)
    mount_console(app, gw)  # /console: the web console, with its own cookie login
    gw.route_rights = check_routes(app)
    app.add_middleware(GatewayMiddleware, gateway=gw)
    app.add_middleware(MetricsMiddleware)  # added last: outermost, so refused requests are counted too
    app.openapi = lambda: gw.openapi(app)  # type: ignore[method-assign]
    return app
