"""Layer 3: a fleet rate-limit backlog far beyond the in-thread wait, across three real worker processes.

Issue 13, item 5: a task whose slot was further back than the reservation horizon re-queued about once a
second, so the count budget (``DSPEX_RATE_LIMIT_MAX_REQUEUES``, 200) was really ~200 s of backlog, and a
330-task backlog at 60 rpm failed 8 tasks. Now a task reserves its slot however far back, comes back for it
(at most every ``DSPEX_RATE_LIMIT_MAX_COUNTDOWN_S``), and its wait is bounded by time. Scaled down: 240 rpm,
countdowns of at most 5 s, and a count budget of 0 (any count-bounded task would fail on its first re-queue).
"""

from __future__ import annotations

import json
import math
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from dspex_tasks.client import Client
from dspex_tasks.settings import Settings
from dspex_tasks.testing.mock_server import MockLMServer
from tests._procs import WorkerProcess, wait_for

pytestmark = pytest.mark.system

RPS, BURST = 4, 2  # the fleet-wide limit on openai/limited: 240 rpm
TASKS = 100  # (100 - 2) / 4 = 24.5 s of backlog: 24 in-thread waits, 5 countdown caps
COUNTDOWN_S = 5.0  # DSPEX_RATE_LIMIT_MAX_COUNTDOWN_S
RETRY_LINE = re.compile(r"Task dspex\.lc_limited\[([^\]]+)\] retry: Retry in ([\d.]+)s")


@pytest.fixture(scope="module")
def server() -> Iterator[MockLMServer]:
    mock = MockLMServer(port=0, latency_ms=2).start()
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def fleet(redis_base_url: str, server: MockLMServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, list[WorkerProcess]]]:
    """Three worker processes sharing one namespace, queue and limit."""
    import redis

    from dspex_tasks import keys

    ns = f"rlb{uuid.uuid4().hex[:8]}"
    queue = f"{ns}.predict"
    env = {
        "DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": server.url, "DSPEX_LM_API_KEY": "sk-test-not-real",
        "DSPEX_LM_ENDPOINTS": json.dumps({"openai/limited": {"api_base": server.url}}),
        "DSPEX_RATE_LIMITS": json.dumps({"openai/limited": {"rps": RPS, "burst": BURST}}),
        "DSPEX_RATE_LIMIT_MAX_REQUEUES": "0", "DSPEX_RATE_LIMIT_MAX_COUNTDOWN_S": str(COUNTDOWN_S),
        "DSPEX_TASK_MAX_RETRIES": "0", "DSPEX_LM_TIMEOUT_S": "10", "DSPEX_LOG_EACH_TASK": "true",  # retry lines
        "DSPEX_SIGNATURE_MODULES": "signatures,tests.system._lmcontrol_signatures", "DSPEX_PREDICT_QUEUE": queue,
    }
    log_dir = tmp_path_factory.mktemp("rate-limit-backlog")
    procs = [WorkerProcess(redis_base_url, ns, queues=queue, concurrency=8, log_dir=log_dir, env=env)
             for _ in range(3)]
    r = redis.Redis.from_url(redis_base_url)
    try:
        for p in procs:
            p.wait_ready(timeout_s=60)
        wait_for(lambda: r.hexists(keys.signatures(ns), "lc_limited"), timeout_s=30, what="signatures published")
        yield Settings(redis_url=redis_base_url, namespace=ns, predict_queue=queue), procs
    finally:
        r.close()
        for p in procs:  # warm shutdown of all three at once, then reap each
            p.send(signal.SIGTERM)
        for p in procs:
            p.stop(timeout_s=10)


def _max_in_window(times: list[float], window_s: float) -> int:
    times = sorted(times)
    return max((sum(1 for s in times[i:] if s < t + window_s) for i, t in enumerate(times)), default=0)


def test_a_backlog_far_beyond_the_wait_all_succeeds_within_the_fleet_limit(
        fleet: tuple[Settings, list[WorkerProcess]], server: MockLMServer) -> None:
    settings, procs = fleet
    server.control(reset_stats=True)
    client = Client(settings=settings)
    try:
        # Given 240 rpm (burst 2) shared by 3 processes, a re-queue count budget of 0 and countdowns of at most 5 s
        # When 100 tasks arrive at once: 24.5 s of backlog
        t0 = time.monotonic()
        jobs = [client.submit("lc_limited", {"question": f"backlog {i}"}) for i in range(TASKS)]
        results = [job.get(timeout=90) for job in jobs]
        elapsed = time.monotonic() - t0
    finally:
        client.close()
    # Then every task succeeds (none fails because of the limit), served by several processes
    assert len(results) == TASKS and len({r.worker for r in results}) >= 2
    # And the provider saw each request once: no task took a second slot, or sent one slot twice
    times = [entry["t"] for entry in server.request_log()]
    assert len(times) == TASKS
    # And no window W ever held more than burst + rate x W requests, while the rate was used
    for window_s in (1.0, 5.0, 20.0):
        assert _max_in_window(times, window_s) <= BURST + RPS * window_s, window_s
    backlog_s = (TASKS - BURST) / RPS
    assert max(times) - min(times) >= backlog_s - 0.3  # paced, not bunched
    assert max(times) - min(times) <= backlog_s * 1.25  # and not slowed: slots are not lost
    # And each task was re-queued a bounded number of times: once per countdown cap of its wait, at most
    requeued = Counter(m.group(1) for p in procs for m in RETRY_LINE.finditer(p.log()))
    ids = {job.id for job in jobs}
    assert set(requeued) <= ids and len(requeued) >= TASKS - BURST - 2 * RPS
    assert max(requeued.values()) <= math.ceil(backlog_s / COUNTDOWN_S) + 1
    print(f"\nbacklog: {TASKS} tasks in {elapsed:.1f}s (slots over {max(times) - min(times):.1f}s); re-queues per task "
          f"max {max(requeued.values())}, mean {sum(requeued.values()) / TASKS:.2f}; max in any 1 s "
          f"{_max_in_window(times, 1.0)} (bound {BURST + RPS}), in any 20 s {_max_in_window(times, 20.0)} "
          f"(bound {BURST + 20 * RPS})")
