"""Layer 3: ``dspex demo`` starts its own Redis and workers, runs a batch, and leaves no process behind."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests._procs import ROOT
from tests.system._cli import command_line, processes_with_env, wait_until_gone

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="needs /proc to find leftover processes"),
]

DEMO = [sys.executable, "-m", "dspex_tasks", "demo", "--workers", "1", "--sessions", "4"]


def _env(marker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPEX_")}
    # Nothing listens on port 1, so the demo must start (and stop) a private redis-server.
    env.update({"DSPEX_REDIS_URL": "redis://127.0.0.1:1/0", "DSPEX_TEST_MARKER": marker, "COLUMNS": "160",
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"})
    return env


def _redis_pid(output: str) -> int:
    """The private redis-server's pid, from the demo's first line (its title hides our marker)."""
    found = re.search(r"private redis-server on port \d+, pid (\d+)", output)
    assert found, output
    return int(found.group(1))


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while "redis-server" in (command_line(pid) or ""):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def test_demo_runs_on_a_private_redis_and_leaves_no_processes() -> None:
    marker = f"demo-{uuid.uuid4().hex}"
    # When the demo runs with an unreachable DSPEX_REDIS_URL
    result = subprocess.run([*DEMO, "--tasks", "40"], cwd=ROOT, env=_env(marker), capture_output=True, text=True,
                            timeout=120, check=False)
    # Then it succeeds on a private Redis, shows versioned programs and throughput, and cleans up
    assert result.returncode == 0, result.stdout + result.stderr
    assert "private redis-server" in result.stdout
    assert "acme/qa v2" in result.stdout and "rolled back" in result.stdout
    assert "40/40 tasks ok" in result.stdout and "tasks/s" in result.stdout
    assert "stopped 1 worker and private Redis" in result.stdout
    assert wait_until_gone(f"DSPEX_TEST_MARKER={marker}") == []
    assert _gone(_redis_pid(result.stdout))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_demo_stops_its_workers_and_redis(sig: signal.Signals) -> None:
    marker = f"demo-{uuid.uuid4().hex}"
    entry = f"DSPEX_TEST_MARKER={marker}"
    # Given a demo with far more tasks than it can finish, once its workers are up
    proc = subprocess.Popen([*DEMO, "--tasks", "1000000"], cwd=ROOT, env=_env(marker), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or []], daemon=True).start()
    seen = []
    try:
        deadline = time.monotonic() + 60
        while not any("workers:" in line for line in seen):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=0.5))
        started = processes_with_env(entry)
        redis_pid = _redis_pid("".join(seen))
        assert any("celery" in cmd and "worker" in cmd for _, cmd in started), started
        assert "redis-server" in (command_line(redis_pid) or "")
        # When it is interrupted
        time.sleep(0.5)
        proc.send_signal(sig)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Then it exits as interrupted and nothing it started is left running
    assert code == 130, "".join(seen)
    assert wait_until_gone(entry) == []
    assert _gone(redis_pid)
