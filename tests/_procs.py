"""Real worker processes for system tests: start, wait until serving, stop without orphans."""

from __future__ import annotations

import contextlib
import os
import signal as signals
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def worker_env(redis_url: str, namespace: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPEX_")}
    env.update({"DSPEX_REDIS_URL": redis_url, "DSPEX_NAMESPACE": namespace,
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


class WorkerProcess:
    """One ``celery -A workers.app worker`` OS process (as on its own host)."""

    def __init__(self, redis_url: str, namespace: str, *, queues: str | None = "dspex.predict", concurrency: int = 16,
                 pool: str = "threads", name: str | None = None, log_dir: Path | None = None,
                 env: dict[str, str] | None = None, route: str = "celery", cwd: Path | None = None) -> None:
        """``queues=None`` passes no ``-Q`` (the worker's defaults); ``route="dspex"`` runs the ``dspex worker``
        console script instead of ``celery -A workers.app worker``; ``cwd`` is where it starts (the repo root)."""
        self.name = name or f"w{uuid.uuid4().hex[:6]}"
        self.hostname = f"{self.name}@test"
        self.log_path = (log_dir or Path("/tmp")) / f"worker-{self.name}.log"
        if route == "dspex":
            cmd = [str(Path(sys.executable).parent / "dspex"), "worker"]
        else:
            cmd = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--without-mingle", "--without-gossip"]
        cmd += ["--pool", pool, "-c", str(concurrency), "-n", self.hostname, "--loglevel", "INFO"]
        if queues is not None:
            cmd += ["-Q", queues]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=worker_env(redis_url, namespace, **(env or {})),
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until the worker logs that it is ready (after pre-warm)."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            if "ready." in self.log():
                return
            time.sleep(0.1)
        raise TimeoutError(f"worker {self.name} not ready in {timeout_s}s:\n{self.log()[-3000:]}")

    def send(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill_group(self, sig: int = signals.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """Warm shutdown (SIGTERM), then SIGKILL the whole group if it lingers."""
        if self.proc.poll() is None:
            self.send(signals.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        self.kill_group(signals.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def wait_for(predicate: Any, timeout_s: float = 10.0, interval_s: float = 0.05, what: str = "condition") -> Any:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not met within {timeout_s}s")


@contextlib.contextmanager
def celery_events(app: Any, handlers: dict[str, Any]) -> Any:
    """Receive the workers' Celery events (all Flower reads) in a background thread while the block runs."""
    import threading

    conn = app.connection_for_read()
    recv = app.events.Receiver(conn, handlers=handlers)
    ready = threading.Event()

    def receive() -> None:
        ready.set()
        with contextlib.suppress(Exception):  # stopped by closing its connection
            recv.capture(limit=None, timeout=None, wakeup=False)

    threading.Thread(target=receive, daemon=True).start()
    ready.wait(5)
    time.sleep(0.3)  # subscribed before the block sends anything
    try:
        yield recv
    finally:
        conn.close()
