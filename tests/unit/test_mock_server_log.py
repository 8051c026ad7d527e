"""The mock LM server's request log and context-length knob (used by the LM-control system tests)."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import dspy
import pytest
from dspy.utils.exceptions import ContextWindowExceededError

from dspex_tasks.testing.mock_server import MockLMServer

pytestmark = pytest.mark.unit


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_request_log_and_context_length_knob() -> None:
    with MockLMServer(port=0, import_modules=False) as server:
        lm = dspy.LM("openai/mock", api_base=server.url, api_key="sk-test", cache=False, num_retries=0)
        t0 = time.time()
        lm.forward(messages=[{"role": "user", "content": "hi"}])
        server.control(fail_next=1, status=400)
        with pytest.raises(ContextWindowExceededError):
            lm.forward(messages=[{"role": "user", "content": "long"}])
        log = server.request_log()
        assert [e["status"] for e in log] == [200, 400] and all(t0 <= e["t"] <= time.time() for e in log)
        base = server.url.removesuffix("/v1")
        assert _get(f"{base}/_log") == log
        stats = _get(f"{base}/_stats?log=1")
        assert stats["requests"] == 2 and stats["log"] == log and "log" not in _get(f"{base}/_stats")
        server.control(reset_stats=True)
        assert server.request_log() == []
