"""A provider 401 that echoes the key leaks it nowhere; an optimization whose LM refuses the key fails typed.

A real worker process, a real Redis and the HTTP mock LM answering every call with a 401 whose message
carries the request's ``Authorization`` header (``echo_key``), as some providers do.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from dspex_tasks import errors
from dspex_tasks.client import Client
from dspex_tasks.testing.mock_server import MockLMServer
from tests._procs import WorkerProcess, wait_for
from tests.system.test_faults import _dump_redis

pytestmark = pytest.mark.system


def test_a_provider_401_echoing_the_key_leaks_it_nowhere_and_an_optimization_fails_typed(
        client: Client, redis_url: str, namespace: str, tmp_path: Path) -> None:
    key = f"sk-leaky-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    # Given a provider that refuses every call with a 401 quoting the credential it was sent
    server = MockLMServer(port=0, latency_ms=1, error_rate=1.0, status=401).start()
    server.control(echo_key=True)
    env = {"DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": server.url, "DSPEX_LM_API_KEY": key,
           "DSPEX_LM_NUM_RETRIES": "0", "DSPEX_TASK_MAX_RETRIES": "0", "DSPEX_LOG_EACH_TASK": "1"}
    w = WorkerProcess(redis_url, namespace, queues="dspex.predict,dspex.optimize", log_dir=tmp_path, env=env,
                      name="leaky")
    try:
        w.wait_ready()
        wait_for(lambda: "qa" in client.signatures(refresh=True), what="signatures published")
        # When predictions fail with that 401
        jobs = [client.submit("qa", {"question": f"q{i}"}, session="leak") for i in range(3)]
        for job in jobs:
            # Then the client gets the typed error, its text masked
            with pytest.raises(errors.LMAuthError) as caught:
                job.get(timeout=30)
            assert key not in str(caught.value) and key not in repr(caught.value.args)
            assert "***" in str(caught.value)
        assert server.stats()["errors"] >= 3  # the provider really answered 401
        # When an optimization runs against the same provider
        run = client.optimize("qa", [{"question": f"r{i}", "answer": "x"} for i in range(6)], session="leak")
        # Then it fails with the typed error instead of succeeding with score 0.0
        with pytest.raises(errors.LMAuthError) as failed:
            run.get(timeout=60)
        assert key not in str(failed.value)
        assert run.status()["status"] == "failed"
        wait_for(lambda: "LMAuthError" in w.log(), timeout_s=10, what="the failure logged")
    finally:
        w.stop()
        server.stop()
    # And the key is nowhere: not in any Redis key (results, run records, events), not in the worker's log
    dump = _dump_redis(client.redis)
    assert "LMAuthError" in dump  # the failures were stored ...
    assert key not in dump  # ... masked
    log = w.log()
    assert key not in log and "***" in log
