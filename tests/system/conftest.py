"""Fixtures for the ``dspex`` command-line system tests: a real worker process and a CLI runner."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from tests._procs import ROOT, WorkerProcess, wait_for
from tests.system._cli import CliTarget, Dspex


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
