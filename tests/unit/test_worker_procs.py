"""Layer 1: the worker-process supervisor, with stand-in processes instead of celery workers."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from dspex_tasks.errors import ConfigurationError
from dspex_tasks.worker.procs import PACKAGE_ROOT, WorkerGroup, celery_worker_argv, supervise, worker_env

pytestmark = pytest.mark.unit

# Exits 0 on SIGTERM, like a celery worker's warm shutdown.
POLITE = [sys.executable, "-c", "import signal, sys, time\n"
          "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\nprint('up', flush=True)\ntime.sleep(60)"]
# Ignores SIGTERM, like a worker stuck in a task.
STUBBORN = [sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('up', flush=True)\ntime.sleep(60)"]
CRASHING = [sys.executable, "-c", "import sys, time\ntime.sleep(0.3)\nsys.exit(3)"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_worker_env_puts_the_package_root_on_pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = worker_env({"DSPEX_NAMESPACE": "x"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(PACKAGE_ROOT), "/elsewhere"]
    assert env["DSPEX_NAMESPACE"] == "x"
    assert (PACKAGE_ROOT / "workers" / "app.py").is_file()


def test_celery_worker_argv() -> None:
    argv = celery_worker_argv(hostname="w1@%h", queues=["a", "b"], pool="threads", concurrency=4, loglevel="INFO")
    assert argv[:6] == [sys.executable, "-m", "celery", "-A", "dspex_tasks.worker.celery_app", "worker"]
    assert argv[argv.index("-Q") + 1] == "a,b" and argv[argv.index("-n") + 1] == "w1@%h"


def test_stop_kills_a_straggler_after_the_timeout(tmp_path: Path) -> None:
    group = WorkerGroup({"polite": POLITE, "stubborn": STUBBORN}, log_dir=tmp_path).start()
    group.wait(lambda: all("up" in group.log_tail(n) for n in group.names), timeout_s=10)
    pids = group.pids
    t0 = time.monotonic()
    codes = group.stop(timeout_s=0.5)
    assert codes == {"polite": 0, "stubborn": -signal.SIGKILL}
    assert time.monotonic() - t0 < 5
    assert not any(_alive(pid) for pid in pids.values())


def test_wait_fails_fast_when_a_process_dies(tmp_path: Path) -> None:
    with WorkerGroup({"crash": CRASHING}, log_dir=tmp_path) as group, \
            pytest.raises(ConfigurationError, match="worker crash exited with code 3"):
        group.wait(lambda: False, timeout_s=10)


def test_supervise_stops_the_others_when_one_dies() -> None:
    group = WorkerGroup({"a": POLITE, "b": CRASHING})
    messages: list[str] = []
    assert supervise(group, report=messages.append, poll_s=0.05) == 1
    assert group.poll() == {"a": 0, "b": 3}
    assert any("worker b exited with code 3; stopping the others" in m for m in messages)
    assert not any(_alive(pid) for pid in group.pids.values())


def test_supervise_forwards_sigterm_for_a_warm_shutdown() -> None:
    group = WorkerGroup({"a": POLITE, "b": POLITE})
    messages: list[str] = []
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(1.0, os.kill, args=(os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        code = supervise(group, report=messages.append, poll_s=0.05)
    finally:
        timer.cancel()
    assert code == 0
    assert group.poll() == {"a": 0, "b": 0}
    assert any("SIGTERM: warm shutdown of 2 workers" in m for m in messages)
    assert signal.getsignal(signal.SIGTERM) == before
