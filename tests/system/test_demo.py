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
from collections.abc import Iterator

import pytest

from tests._procs import ROOT
from tests.system._cli import command_line, processes_with_env, wait_until_gone

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="needs /proc to find leftover processes"),
]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a mask is inherited too


class Demo:
    """One ``dspex demo`` process, tagged with a unique environment variable that its children inherit."""

    def __init__(self, *args: str, redis_url: str = "redis://127.0.0.1:1/0") -> None:
        self.entry = f"DSPEX_TEST_MARKER=demo-{uuid.uuid4().hex}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSPEX_")}
        # PYTHONFAULTHANDLER: a demo that hangs is sent SIGABRT by wait(), and its threads' stacks are in the output
        env.update({"DSPEX_REDIS_URL": redis_url, "COLUMNS": "160", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1",
                    "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
        env.update([self.entry.split("=", 1)])
        # Ctrl-C as a terminal delivers it: to a process whose SIGINT is neither ignored nor blocked (a child
        # keeps both from its parent; in full runs the demo, started from the test process, once sat out a
        # SIGINT for 30 s while still submitting)
        self.proc = subprocess.Popen([sys.executable, "-m", "dspex_tasks", "demo", "--workers", "1", *args], cwd=ROOT,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     preexec_fn=_default_sigint)
        self._lines: queue.Queue[str] = queue.Queue()
        self.output = ""
        threading.Thread(target=lambda: [self._lines.put(line) for line in self.proc.stdout or []],
                         daemon=True).start()

    def _drain(self, timeout_s: float) -> None:
        with contextlib.suppress(queue.Empty):
            self.output += self._lines.get(timeout=timeout_s)
            while True:
                self.output += self._lines.get_nowait()

    def wait_for_output(self, text: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.output:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.output
            self._drain(0.2)

    def wait(self, timeout_s: float = 120.0) -> int:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self._drain(1.0)
            raise AssertionError(f"demo still running after {timeout_s} s; its output and stacks:\n"
                                 f"{self.output[-12000:]}") from None
        time.sleep(0.1)
        self._drain(0.1)
        return code

    def redis_pid(self) -> int:
        """The private redis-server's pid, from the demo's first line (its rewritten title hides the marker)."""
        found = re.search(r"private redis-server on port \d+, pid (\d+)", self.output)
        assert found, self.output
        return int(found.group(1))

    def close(self) -> None:
        """After a failed test too: stop the demo the polite way, then whatever it left behind."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        leftovers = [pid for pid, _ in processes_with_env(self.entry)]
        with contextlib.suppress(AssertionError):
            if "redis-server" in (command_line(self.redis_pid()) or ""):
                leftovers.append(self.redis_pid())
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def demo(*args: str, **kwargs: str) -> Iterator[Demo]:
    run = Demo(*args, **kwargs)
    try:
        yield run
    finally:
        run.close()


def redis_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while "redis-server" in (command_line(pid) or ""):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def test_demo_runs_on_a_private_redis_and_leaves_no_processes() -> None:
    # When the demo runs with an unreachable DSPEX_REDIS_URL
    with demo("--tasks", "40", "--sessions", "4") as run:
        code = run.wait()
        # Then it succeeds on a private Redis, shows versioned programs and throughput, and cleans up
        assert code == 0, run.output
        assert "private redis-server" in run.output
        assert "acme/qa v2" in run.output and "rolled back" in run.output
        assert "40/40 tasks ok" in run.output and "tasks/s" in run.output
        assert "stopped 1 worker and private Redis" in run.output
        assert wait_until_gone(run.entry) == []
        assert redis_gone(run.redis_pid())


def test_demo_on_a_configured_redis_leaves_nothing_behind(redis_base_url: str) -> None:
    import redis

    r = redis.Redis.from_url(redis_base_url)
    results_before = len(list(r.scan_iter(match="celery-task-meta-*")))
    with demo("--tasks", "8", "--sessions", "2", redis_url=redis_base_url) as run:
        code = run.wait()
        assert code == 0, run.output
        assert "Redis: configured" in run.output and "8/8 tasks ok" in run.output
        found = re.search(r"namespace (demo-[0-9a-f]+)", run.output)
        assert found, run.output
        # Then its namespace, queue and queue binding are gone, and so are its results and processes
        assert list(r.scan_iter(match=f"*{found.group(1)}*")) == []
        assert len(list(r.scan_iter(match="celery-task-meta-*"))) == results_before
        assert wait_until_gone(run.entry) == []
    r.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_demo_stops_its_workers_and_redis(sig: signal.Signals) -> None:
    # Given a demo with far more tasks than it can finish, once its workers are up
    with demo("--tasks", "1000000", "--sessions", "4") as run:
        run.wait_for_output("workers:")
        redis_pid = run.redis_pid()
        assert any("celery" in cmd and "worker" in cmd for _, cmd in processes_with_env(run.entry))
        assert "redis-server" in (command_line(redis_pid) or "")
        # When it is interrupted
        time.sleep(0.5)
        run.proc.send_signal(sig)
        code = run.wait(timeout_s=30)
        # Then it exits as interrupted and nothing it started is left running
        assert code == 130, run.output
        assert "stopped 1 worker and private Redis" in run.output
        assert wait_until_gone(run.entry) == []
        assert redis_gone(redis_pid)
