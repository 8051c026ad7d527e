"""Shared plumbing for the runtime benchmarks: a private Redis, worker OS processes, the HTTP mock LM.

Every child runs in its own session (``start_new_session=True``), so a terminal Ctrl-C reaches only the
benchmark process, which then stops each child itself: SIGCONT (a paused worker cannot handle SIGTERM),
SIGTERM, and SIGKILL to the whole process group of anything that lingers. :func:`cleanup_all` is the one
place that does it; it runs from ``finally`` blocks, from ``atexit``, and after SIGTERM/SIGHUP (which are
turned into ``KeyboardInterrupt`` by :func:`install_signal_handlers`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

__all__ = [
    "ROOT",
    "ManagedProcess",
    "MockLMProcess",
    "WorkerProcess",
    "child_env",
    "cleanup_all",
    "free_port",
    "install_signal_handlers",
    "machine_info",
    "wait_results",
]

_LIVE: list[ManagedProcess] = []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    redis_version = "unknown"
    with contextlib.suppress(Exception):
        from dspex_tasks.testing.redis_server import find_redis_server

        out = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True, timeout=10)
        redis_version = out.stdout.split("v=", 1)[1].split()[0] if "v=" in out.stdout else out.stdout.strip()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "nproc": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "dspy": version("dspy"),
        "celery": version("celery"),
        "kombu": version("kombu"),
        "redis_py": version("redis"),
        "litellm": version("litellm"),
        "redis_server": redis_version,
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def child_env(redis_url: str | None = None, **extra: str) -> dict[str, str]:
    """This environment without any outside ``DSPEX_*`` setting, with the repo on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPEX_")}
    paths = [str(ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env.update({"PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1",
                "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    if redis_url is not None:
        env["DSPEX_REDIS_URL"] = redis_url
    env.update(extra)
    return env


class ManagedProcess:
    """A child OS process in its own process group, logged to a file, stopped without orphans."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        _LIVE.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _killpg(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def pause(self) -> None:
        """SIGSTOP the whole group: it takes no CPU and consumes no messages until :meth:`resume`."""
        self._killpg(signal.SIGSTOP)

    def resume(self) -> None:
        self._killpg(signal.SIGCONT)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGCONT, SIGTERM (warm shutdown), then SIGKILL the group; safe to call repeatedly."""
        if self.alive:
            self._killpg(signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        self._killpg(signal.SIGKILL)  # the process if it lingers, and anything it left in its group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if not self._log.closed:
            self._log.close()
        with contextlib.suppress(ValueError):
            _LIVE.remove(self)
        return self.proc.returncode


class WorkerProcess(ManagedProcess):
    """One ``celery -A <app> worker`` OS process."""

    def __init__(self, app: str, *, redis_url: str, queues: str, concurrency: int, log_dir: Path,
                 pool: str = "threads", name: str | None = None, env: dict[str, str] | None = None) -> None:
        name = name or f"w{uuid.uuid4().hex[:6]}"
        self.hostname = f"{name}@bench"
        argv = [sys.executable, "-m", "celery", "-A", app, "worker", "--pool", pool, "-c", str(concurrency),
                "-Q", queues, "-n", self.hostname, "--loglevel", "INFO", "--without-mingle", "--without-gossip"]
        super().__init__(f"worker-{name}", argv, child_env(redis_url, **(env or {})), log_dir)

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Until Celery logs ``ready.`` (after our pre-warm, which runs in ``worker_init``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            if "ready." in self.log():
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready within {timeout_s} s:\n{self.log()[-3000:]}")


class MockLMProcess(ManagedProcess):
    """The OpenAI-compatible mock LM server in its own OS process (so it never shares our GIL)."""

    def __init__(self, *, latency_ms: float, log_dir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        code = f"from dspex_tasks.testing.mock_server import serve; serve(port={self.port}, latency_ms={float(latency_ms)!r})"
        env = child_env(None, DSPEX_SIGNATURE_MODULES="signatures")
        super().__init__(f"mock-lm-{self.port}", [sys.executable, "-c", code], env, log_dir)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.base}/v1"

    def _request(self, path: str, body: dict[str, Any] | None = None, timeout_s: float = 5.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - loopback only
            return json.loads(resp.read())

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            with contextlib.suppress(OSError, ValueError):
                if self._request("/health", timeout_s=0.5).get("status") == "ok":
                    return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready within {timeout_s} s:\n{self.log()[-3000:]}")

    def stats(self) -> dict[str, int]:
        return dict(self._request("/_stats"))

    def reset_stats(self) -> dict[str, Any]:
        return dict(self._request("/_control", {"reset_stats": True}))


def wait_results(redis_client: Any, result_keys: Sequence[str | bytes], *, timeout_s: float,
                 poll_s: float = 0.02) -> tuple[float, list[dict[str, Any]]]:
    """Wait until every result key exists; returns (wall time it was seen, decoded results).

    Polls with ``EXISTS`` in batches (cheap, nothing decoded), then reads each result once.
    """
    deadline = time.monotonic() + timeout_s
    pending = list(result_keys)
    while pending:
        batch = pending[:1000]
        if int(redis_client.exists(*batch)) == len(batch):
            pending = pending[len(batch):]
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} of {len(result_keys)} results missing after {timeout_s} s")
        time.sleep(poll_s)
    seen = time.time()
    out: list[dict[str, Any]] = []
    for i in range(0, len(result_keys), 1000):
        out.extend(json.loads(raw) for raw in redis_client.mget(result_keys[i:i + 1000]))
    return seen, out


def date_done(result: dict[str, Any]) -> float | None:
    """The worker's wall-clock completion time of one stored Celery result (epoch seconds)."""
    value = result.get("date_done")
    if not value:
        return None
    return datetime.fromisoformat(str(value)).timestamp()


def new_log_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="dspex-bench-"))


def cleanup_all() -> None:
    """Stop every child still running (newest first), ignoring Ctrl-C while doing it."""
    previous = signal.getsignal(signal.SIGINT)
    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for proc in reversed(list(_LIVE)):
            with contextlib.suppress(Exception):
                proc.stop()
    finally:
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGINT, previous)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP raise ``KeyboardInterrupt`` so ``finally`` blocks stop the children."""

    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


atexit.register(cleanup_all)
