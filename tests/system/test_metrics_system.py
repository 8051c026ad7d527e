"""Layer 3: a real worker process serves Prometheus /metrics, and ``dspex status`` sums the same counters."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from prometheus_client.parser import text_string_to_metric_families

from dspex_tasks import keys
from dspex_tasks.client import Client
from dspex_tasks.testing.mock_server import MockLMServer
from tests._procs import ROOT, WorkerProcess, wait_for, worker_env

pytestmark = pytest.mark.system

N = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Sample name and sorted labels -> value, from the worker's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def mock_lm() -> Iterator[MockLMServer]:
    server = MockLMServer(port=0, latency_ms=5).start()
    yield server
    server.stop()


@pytest.fixture
def metrics_port() -> int:
    return free_port()


@pytest.fixture
def worker(redis_url: str, namespace: str, mock_lm: MockLMServer, metrics_port: int,
           tmp_path: Path) -> Iterator[WorkerProcess]:
    env = {"DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": mock_lm.url, "DSPEX_LM_API_KEY": "sk-test-not-real",
           "DSPEX_METRICS_PORT": str(metrics_port)}
    proc = WorkerProcess(redis_url, namespace, concurrency=16, log_dir=tmp_path, env=env)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_worker_serves_metrics_and_status_sums_them(redis_url: str, namespace: str, worker: WorkerProcess,
                                                    metrics_port: int) -> None:
    # Given a worker process with DSPEX_METRICS_PORT set, serving /metrics from warm-up
    before = scrape(metrics_port)
    assert sample(before, "dspex_tasks_total", signature="qa", outcome="success") == 0
    client = Client(redis_url=redis_url, namespace=namespace)
    try:
        wait_for(lambda: "qa" in client.signatures(refresh=True), what="signatures published")
        # When N qa tasks run in a session
        jobs = [client.submit("qa", {"question": f"q{i}"}, session="metrics-s") for i in range(N)]
        results = [job.get(timeout=30) for job in jobs]
    finally:
        client.close()
    assert all(r.lm == "openai/mock" for r in results)
    prompt_tokens = sum(r.usage["prompt_tokens"] for r in results)

    # Then the scrape shows N successes, N durations, their tokens and N program lookups
    # (task_postrun runs just after the result is stored, so the last ones may trail get() briefly)
    def settled() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        samples = scrape(metrics_port)
        return samples if sample(samples, "dspex_tasks_total", signature="qa", outcome="success") == N else None

    samples = wait_for(settled, timeout_s=10, what=f"{N} successes on /metrics")
    assert sample(samples, "dspex_task_duration_seconds_count", signature="qa") == N
    assert sample(samples, "dspex_task_duration_seconds_sum", signature="qa") > 0
    assert sample(samples, "dspex_lm_calls_total", model="openai/mock") == N
    assert sample(samples, "dspex_lm_tokens_total", model="openai/mock", kind="prompt") == prompt_tokens > 0
    assert sample(samples, "dspex_lm_tokens_total", model="openai/mock", kind="completion") > 0
    assert sample(samples, "dspex_lm_cost_usd_total", model="openai/mock") == 0  # not in LiteLLM's price table
    assert (sample(samples, "dspex_program_cache_hits_total")
            + sample(samples, "dspex_program_cache_misses_total")) == N
    assert sample(samples, "dspex_program_cache_misses_total") >= 1
    assert sample(samples, "dspex_program_cache_size") >= 1
    assert sample(samples, "dspex_tasks_total", signature="qa", outcome="failure") == 0

    # And after the flush interval the worker's Redis snapshot carries them, so `dspex status --json` shows them
    r = redis_lib.Redis.from_url(redis_url)
    try:
        def flushed() -> bool:
            for key in r.scan_iter(match=keys.worker_stats_pattern(namespace)):
                raw = r.hget(key, "metrics")
                if raw and json.loads(raw)["tasks"].get("qa", {}).get("success") == N:
                    return True
            return False

        wait_for(flushed, timeout_s=10, interval_s=0.2, what="metrics snapshot in Redis")
    finally:
        r.close()
    out = subprocess.run([sys.executable, "-m", "dspex_tasks", "status", "--json"], cwd=ROOT,
                         env=worker_env(redis_url, namespace), capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    metrics = status["metrics"]
    assert metrics["tasks"]["qa"] == {"success": N}
    assert metrics["tasks_total"]["success"] == N
    assert metrics["lm"]["openai/mock"]["calls"] == N and metrics["lm"]["openai/mock"]["prompt_tokens"] == prompt_tokens
    assert any(e.endswith(f":{metrics_port}") for e in metrics["endpoints"])
    assert status["cache"]["hits"] + status["cache"]["misses"] == N
    assert metrics["cache_hit_rate"] == status["cache"]["hit_rate"] is not None
