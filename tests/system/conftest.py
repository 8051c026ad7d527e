"""Fixtures for the ``dspex`` command-line system tests: a real worker process and a CLI runner."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dspex_tasks.client import Client
from tests._procs import ROOT, WorkerProcess, wait_for
from tests.system._cli import CliTarget, Dspex


@pytest.fixture
def client(redis_url: str, namespace: str) -> Iterator[Client]:
    """A client on the test's flushed DB and namespace (closed afterwards)."""
    c = Client(redis_url=redis_url, namespace=namespace)
    yield c
    c.close()


@pytest.fixture(scope="module")
def cli_target(redis_base_url: str) -> CliTarget:
    # Module-scoped on purpose: the per-test ``redis_url`` fixture flushes the DB, which would wipe the
    # long-lived worker's queue bindings; a namespace and a queue of our own isolate us instead.
    ns = f"cli{uuid.uuid4().hex[:8]}"
    return CliTarget(redis_base_url, ns, f"{ns}.predict")


@pytest.fixture(scope="module")
def cli_worker(cli_target: CliTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """One ``celery -A workers.app worker`` OS process serving the reference signatures (mock LM)."""
    import redis

    from dspex_tasks import keys

    proc = WorkerProcess(cli_target.redis_url, cli_target.namespace, queues=cli_target.queue, concurrency=8,
                         name=f"clitest-{cli_target.namespace}", log_dir=tmp_path_factory.mktemp("cli-worker"),
                         env={"DSPEX_PREDICT_QUEUE": cli_target.queue})
    r = redis.Redis.from_url(cli_target.redis_url)
    try:
        proc.wait_ready(timeout_s=60)
        wait_for(lambda: r.hexists(keys.signatures(cli_target.namespace), "qa"), timeout_s=30,
                 what="signatures published")
        yield proc
    finally:
        r.close()
        proc.stop(timeout_s=10)


@pytest.fixture
def dspex(cli_target: CliTarget) -> Dspex:
    """Run ``python -m dspex_tasks ARGS`` against the test Redis; returns the completed process."""

    def run(*args: str, stdin: str | None = None, timeout_s: float = 60.0,
            **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dspex_tasks", *args], cwd=ROOT, env=cli_target.env(**env),
                              input=stdin, capture_output=True, text=True, timeout=timeout_s, check=False)

    return run


@pytest.fixture(scope="module")
def opt_target(redis_base_url: str) -> CliTarget:
    """A namespace and predict queue of their own for optimization tests (the optimize queue is ``<ns>.optimize``)."""
    ns = f"opt{uuid.uuid4().hex[:8]}"
    return CliTarget(redis_base_url, ns, f"{ns}.predict")


def _optimize_queue(target: CliTarget) -> str:
    return f"{target.namespace}.optimize"


@pytest.fixture(scope="module")
def opt_worker(opt_target: CliTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """One worker OS process consuming both queues, predict and optimize, with the ``learns_from_demos`` mock LM."""
    import redis

    from dspex_tasks import keys

    env = {"DSPEX_PREDICT_QUEUE": opt_target.queue, "DSPEX_OPTIMIZE_QUEUE": _optimize_queue(opt_target),
           "DSPEX_MOCK_SCENARIO": "learns_from_demos"}
    proc = WorkerProcess(opt_target.redis_url, opt_target.namespace,
                         queues=f"{opt_target.queue},{_optimize_queue(opt_target)}", concurrency=16,
                         name=f"opttest-{opt_target.namespace}", log_dir=tmp_path_factory.mktemp("opt-worker"), env=env)
    r = redis.Redis.from_url(opt_target.redis_url)
    try:
        proc.wait_ready(timeout_s=60)
        wait_for(lambda: r.hexists(keys.signatures(opt_target.namespace), "qa")
                 and r.hexists(keys.capabilities(opt_target.namespace), "optimizers"), timeout_s=30,
                 what="signatures and capabilities published")
        yield proc
    finally:
        r.close()
        proc.stop(timeout_s=10)


@pytest.fixture
def dspex_opt(opt_target: CliTarget) -> Dspex:
    """Like ``dspex``, pointed at ``opt_target`` (its namespace, predict and optimize queues)."""

    def run(*args: str, stdin: str | None = None, timeout_s: float = 60.0, cwd: Path = ROOT,
            **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dspex_tasks", *args], cwd=cwd,
                              env=opt_target.env(DSPEX_OPTIMIZE_QUEUE=_optimize_queue(opt_target), **env),
                              input=stdin, capture_output=True, text=True, timeout=timeout_s, check=False)

    return run


# -- RabbitMQ (tests/system/test_rabbitmq.py) ----------------------------------------------------------------------

#: The RabbitMQ the broker tests use unless DSPEX_TEST_AMQP_URL names another (or "off").
AMQP_DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture(scope="session")
def amqp_base_url() -> str:
    """The RabbitMQ of the broker tests: ``DSPEX_TEST_AMQP_URL``, else the local default (``guest``).

    One that does not answer fails each test that needs it, saying how to start one: nothing is skipped
    silently. ``DSPEX_TEST_AMQP_URL=off`` skips them, with that reason in the summary.
    """
    import os

    from dspex_tasks.connections import ping, redacted_url

    url = os.environ.get("DSPEX_TEST_AMQP_URL", "").strip() or AMQP_DEFAULT_URL
    if url.lower() == "off":
        pytest.skip("RabbitMQ broker tests off (DSPEX_TEST_AMQP_URL=off)")
    try:
        ping(url, 3.0)
    except Exception as exc:
        pytest.fail(f"RabbitMQ does not answer at {redacted_url(url)} ({type(exc).__name__}: {exc}): start one "
                    "(rabbitmq-server -detached; .ci/run installs and starts it), point DSPEX_TEST_AMQP_URL at one, "
                    "or set DSPEX_TEST_AMQP_URL=off to skip the RabbitMQ tests", pytrace=False)
    return url


def _rabbitmqctl(*args: str) -> bool:
    import shutil

    exe = shutil.which("rabbitmqctl")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "-q", *args], capture_output=True, timeout=60, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def amqp_url(amqp_base_url: str) -> Iterator[str]:
    """A vhost of the module's own, deleted afterwards: no user's queue or worker is touched, and broadcasts
    (pings, ``active_queues``) reach only this module's workers. It needs ``rabbitmqctl`` on the broker's host;
    without it the base vhost is used, and each test's queues are its own (``<namespace>.predict``, deleted by
    the test)."""
    from urllib.parse import quote, unquote, urlsplit, urlunsplit

    parts = urlsplit(amqp_base_url)
    vhost = f"dspex-test-{uuid.uuid4().hex[:10]}"
    local = parts.hostname in ("127.0.0.1", "localhost", "::1")
    user = unquote(parts.username or "guest")
    if local and _rabbitmqctl("add_vhost", vhost):
        try:
            if _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*"):
                yield urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), parts.query, ""))
                return
        finally:
            _rabbitmqctl("delete_vhost", vhost)
    # The shared vhost: Celery's event and broadcast exchanges go afterwards unless they were there before.
    shared = [name for name in ("celeryev", "celery.pidbox", "reply.celery.pidbox")
              if not _amqp_exchange_exists(amqp_base_url, name)]
    try:
        yield amqp_base_url
    finally:
        _amqp_delete_exchanges(amqp_base_url, shared)


def _amqp_exchange_exists(url: str, name: str) -> bool:
    from dspex_tasks.connections import amqp_connection

    with amqp_connection(url, 5.0) as conn:
        try:
            conn.channel().exchange_declare(name, "topic", passive=True)
        except Exception:  # 404 (closes the channel)
            return False
    return True


def _amqp_delete_exchanges(url: str, names: list[str]) -> None:
    from dspex_tasks.connections import amqp_connection

    with amqp_connection(url, 5.0) as conn:
        for name in names:
            try:
                conn.channel().exchange_delete(name)
            except Exception:  # already gone
                continue
