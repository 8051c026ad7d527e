"""Layer 3 fault matrix, rows 2, 3 and 15: killed under load, a stage outliving the visibility timeout, memory."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dspex_tasks.client import Client
from dspex_tasks.testing.mock_server import MockLMServer
from dspex_tasks.testing.mockgen import rule_answer
from tests._procs import WorkerProcess, wait_for

pytestmark = pytest.mark.system


@pytest.fixture
def mock_lm() -> Iterator[MockLMServer]:
    server = MockLMServer(port=0, latency_ms=300).start()
    yield server
    server.stop()


def lm_env(mock_lm: MockLMServer, **extra: str) -> dict[str, str]:
    return {"DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": mock_lm.url, "DSPEX_LM_API_KEY": "sk-test-not-real",
            "DSPEX_LM_NUM_RETRIES": "0", "DSPEX_LM_TIMEOUT_S": "5", "DSPEX_VISIBILITY_TIMEOUT_S": "10", **extra}


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_whole_worker_killed_under_load_loses_nothing(client: Client, redis_url: str, namespace: str,
                                                      mock_lm: MockLMServer, tmp_path: Path) -> None:
    env = lm_env(mock_lm)
    a = WorkerProcess(redis_url, namespace, concurrency=100, log_dir=tmp_path, env=env, name="doomed")
    b = None
    try:
        a.wait_ready()
        wait_for(lambda: "qa" in client.signatures(refresh=True), what="signatures published")
        # calls that last 2 s, so 50 are in flight at once however slowly a loaded machine starts them
        mock_lm.control(reset_stats=True, latency_ms=2000)
        jobs = [client.submit("qa", {"question": f"load {i}"}, session=f"k{i % 7}") for i in range(200)]
        wait_for(lambda: mock_lm.stats()["in_flight"] >= 50, timeout_s=20, what="calls in flight")
        # When the worker (main process and every thread) is SIGKILLed with work in flight
        t_kill = time.time()
        a.kill_group()
        a.stop()
        b = WorkerProcess(redis_url, namespace, concurrency=100, log_dir=tmp_path, env=env, name="heir")
        b.wait_ready()
        # Then every job's result arrives, each once, within visibility timeout + restore interval + work
        results = [j.get(timeout=90) for j in jobs]
        elapsed = time.time() - t_kill
        assert len({r.task_id for r in results}) == 200 and all(r.outputs["answer"] for r in results)
        assert elapsed < 10 + 1 + 30, elapsed
        assert client.redis.llen("dspex.predict") == 0
    finally:
        for w in (a, b):
            if w is not None:
                w.stop()


@pytest.mark.parametrize("reliable_fetch", ["1", "0"])
def test_stage_outliving_visibility_timeout_never_runs_twice_at_once(client: Client, redis_url: str, namespace: str,
                                                                    mock_lm: MockLMServer, tmp_path: Path,
                                                                    reliable_fetch: str) -> None:
    # Given a visibility timeout (10 s) shorter than the compile stage (~14 s of LM calls), two workers
    mock_lm.control(latency_ms=700, scenario="learns_from_demos")
    env = lm_env(mock_lm, DSPEX_LEASE_TTL_S="4", DSPEX_RELIABLE_FETCH=reliable_fetch)
    procs = [WorkerProcess(redis_url, namespace, queues="dspex.predict,dspex.optimize", concurrency=8,
                           log_dir=tmp_path, env=env, name=f"lease{i}") for i in range(2)]
    try:
        for p in procs:
            p.wait_ready()
        wait_for(lambda: "qa" in client.signatures(refresh=True), what="signatures published")
        rows = [{"question": f"item {i}", "answer": rule_answer({"question": f"item {i}"})} for i in range(22)]
        run = client.optimize("qa", rows[:20], rows[20:], session="v3",
                              params={"max_bootstrapped_demos": 20, "max_labeled_demos": 4, "eval_chunk_size": 2})
        summary = run.get(timeout=120)
        events = list(run.events(timeout=5))
        # Then the redelivered stage waited for the lease instead of running alongside, and the run is whole
        starts = [e for e in events if e["stage"] == "compile" and str(e.get("message", "")).startswith("running")]
        assert len(starts) == 1, starts
        assert summary["promoted"] is True and client.programs.history("v3", "qa") == [1]
        redelivered = list(client.redis.scan_iter(f"{namespace}:deliveries:*"))
        if reliable_fetch == "1":
            # the worker holding the stage kept its message visible to itself: nothing was delivered twice
            assert not redelivered, redelivered
        else:
            # kombu's own fetch restored the still-running stage's message: the lease held the duplicate off
            assert redelivered, "no redelivery happened"
    finally:
        for p in procs:
            p.stop()


def test_memory_and_cache_stay_bounded(client: Client, redis_url: str, namespace: str, tmp_path: Path) -> None:
    env = {"DSPEX_PROGRAM_CACHE_SIZE": "50"}
    w = WorkerProcess(redis_url, namespace, concurrency=16, log_dir=tmp_path, env=env, name="mem")
    try:
        w.wait_ready()
        wait_for(lambda: "qa" in client.signatures(refresh=True), what="signatures published")
        for s in range(500):
            client.programs.put(f"m{s}", "qa", {"demos": [{"question": "q", "answer": "a", "confidence": 0.5}]},
                                signature="qa")

        def batch(lo: int, hi: int) -> None:
            jobs = [client.submit("qa", {"question": f"mem {i}"}, session=f"m{i % 500}") for i in range(lo, hi)]
            for j in jobs:
                j.get(timeout=120)

        batch(0, 600)
        warm = rss_kb(w.pid)
        batch(600, 1800)
        after = rss_kb(w.pid)
        time.sleep(6)  # the worker writes its cache counters every ~5 s
        stats = client.redis.hgetall(next(iter(client.redis.scan_iter(f"{namespace}:workers:*"))))
        size = int(stats[b"size"])
        assert size <= 50 and int(stats[b"evictions"]) > 0
        assert after - warm < 60_000, (warm, after)  # KiB: 1,200 more tasks over 500 sessions add < 60 MB
    finally:
        w.stop()
