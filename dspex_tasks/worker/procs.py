"""Celery worker OS processes: start them, wait until they serve, stop them with no orphans.

Used by ``dspex worker --processes N`` (a small supervisor) and ``dspex demo``.
Each worker runs ``python -m celery -A dspex_tasks.worker.celery_app worker ...`` in its own
session (``start_new_session=True``), so a terminal Ctrl-C reaches only the
parent, which then asks each worker for a warm shutdown (SIGTERM to the main
process) and SIGKILLs the whole process group of any straggler.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigurationError

__all__ = ["PACKAGE_ROOT", "WorkerGroup", "celery_worker_argv", "ping_names", "supervise", "worker_env"]

#: The directory holding ``dspex_tasks`` (a checkout's root, with ``signatures``; or site-packages).
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``extra``, with :data:`PACKAGE_ROOT` on ``PYTHONPATH``.

    In a checkout that makes its ``signatures`` importable from any cwd; the worker's own cwd still comes first
    (``python -m celery`` puts it at ``sys.path[0]``), so a project's own ``signatures`` wins.
    """
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(PACKAGE_ROOT) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), *paths])
    env.update(extra or {})
    return env


def celery_worker_argv(*, hostname: str, queues: Iterable[str], pool: str, concurrency: int, loglevel: str,
                       extra: Iterable[str] = ()) -> list[str]:
    """The command line of one ``celery worker`` process serving ``dspex_tasks.worker.celery_app``."""
    return [sys.executable, "-m", "celery", "-A", "dspex_tasks.worker.celery_app", "worker", "-n", hostname,
            "-Q", ",".join(queues), "-P", pool, "-c", str(concurrency), "--loglevel", loglevel, *extra]


def ping_names(app: Any, timeout_s: float = 0.5) -> set[str]:
    """Node names (the part before ``@``) of the workers that answer a control ping."""
    replies = app.control.inspect(timeout=timeout_s).ping() or {}
    return {name.split("@", 1)[0] for name in replies}


@dataclass
class _Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    log_path: Path | None = None
    expected_exit: bool = field(default=False)


class WorkerGroup:
    """Several worker processes started and stopped together.

    Args:
        commands: name -> argv, one per process.
        env: the processes' environment (see :func:`worker_env`).
        cwd: their working directory (default: this process's).
        log_dir: write each process's stdout and stderr to ``<log_dir>/<name>.log``;
            None lets them share this process's terminal.

    Example:
        >>> with WorkerGroup({"w0": argv}, env=worker_env()) as group:  # doctest: +SKIP
        ...     group.wait(lambda: "w0" in ping_names(app), timeout_s=60)
    """

    def __init__(self, commands: Mapping[str, list[str]], *, env: Mapping[str, str] | None = None,
                 cwd: str | Path | None = None, log_dir: str | Path | None = None) -> None:
        self._procs = [_Proc(name, list(argv)) for name, argv in commands.items()]
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return [p.name for p in self._procs]

    @property
    def pids(self) -> dict[str, int]:
        return {p.name: p.popen.pid for p in self._procs if p.popen is not None}

    def start(self) -> WorkerGroup:
        """Start every process; if one cannot start, stop the ones already started and raise."""
        try:
            for p in self._procs:
                out: Any = None
                if self.log_dir is not None:
                    p.log_path = self.log_dir / f"{p.name}.log"
                    p.log = p.log_path.open("wb")
                    out = p.log
                p.popen = subprocess.Popen(p.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT if out is not None else None,
                                           start_new_session=True)
        except BaseException:
            self.stop(timeout_s=0)
            raise
        return self

    def poll(self) -> dict[str, int | None]:
        """name -> exit code, or None while running."""
        return {p.name: (p.popen.poll() if p.popen is not None else None) for p in self._procs}

    def unexpected_exits(self) -> dict[str, int]:
        """Processes that exited although nobody asked them to."""
        return {p.name: code for p in self._procs
                if not p.expected_exit and p.popen is not None and (code := p.popen.poll()) is not None}

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` to each running main process (SIGTERM: warm shutdown, SIGQUIT: cold)."""
        for p in self._procs:
            if p.popen is not None and p.popen.poll() is None:
                p.expected_exit = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.popen.pid, sig)

    def wait(self, ready: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.2) -> None:
        """Poll ``ready()`` until it is true; fail fast when a process dies.

        Raises:
            ConfigurationError: a process exited (with its log tail) or ``timeout_s`` passed.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            dead = self.unexpected_exits()
            if dead:
                name, code = next(iter(dead.items()))
                raise ConfigurationError(f"worker {name} exited with code {code} while starting:\n{self.log_tail(name)}")
            with contextlib.suppress(Exception):  # Redis or the broker may still be coming up
                if ready():
                    return
            if time.monotonic() >= deadline:
                tails = "\n".join(f"--- {n}\n{self.log_tail(n)}" for n in self.names)
                raise ConfigurationError(f"workers not ready within {timeout_s:.0f} s:\n{tails}")
            time.sleep(interval_s)

    def stop(self, timeout_s: float = 10.0) -> dict[str, int | None]:
        """Warm shutdown: SIGTERM, wait up to ``timeout_s``, then SIGKILL each straggler's process group.

        Safe to call repeatedly. Returns name -> exit code.
        """
        with self._lock:
            self.send(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for p in self._procs:
                if p.popen is None:
                    continue
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
                # Whatever is left in the group (a straggler, prefork children) goes now.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait()
                if p.log is not None:
                    p.log.close()
                    p.log = None
            return self.poll()

    def log_tail(self, name: str, lines: int = 15) -> str:
        """The last lines a process wrote (when logging to files)."""
        for p in self._procs:
            if p.name == name and p.log_path is not None:
                with contextlib.suppress(OSError):
                    return "\n".join(p.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def __enter__(self) -> WorkerGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def supervise(group: WorkerGroup, *, report: Callable[[str], None] = print, poll_s: float = 0.5) -> int:
    """Run ``group`` in the foreground until a signal or a process exit; returns an exit status.

    SIGTERM/SIGINT ask every worker for a warm shutdown and wait for it; a second
    signal asks for a cold one (SIGQUIT). When one worker exits on its own the
    others are shut down too, so an orchestrator sees the failure and restarts
    the whole set. Returns 1 when any worker exited with an error, else 0.
    """
    signals_seen = 0

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            report(f"{signal.Signals(signum).name}: warm shutdown of {len(group.names)} workers "
                   "(again for a cold shutdown)")
            group.send(signal.SIGTERM)
        else:
            group.send(signal.SIGQUIT)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    reported: set[str] = set()
    try:
        group.start()
        report(f"started {len(group.names)} workers: " + ", ".join(f"{n} (pid {pid})" for n, pid in group.pids.items()))
        while any(code is None for code in group.poll().values()):
            for name, code in group.unexpected_exits().items():
                if name not in reported:
                    reported.add(name)
                    report(f"worker {name} exited with code {code}; stopping the others")
                    group.send(signal.SIGTERM)
            time.sleep(poll_s)
    finally:
        codes = group.stop(timeout_s=0 if signals_seen > 1 else 30)
        for s, handler in previous.items():
            signal.signal(s, handler)
    bad = {n: c for n, c in codes.items() if c != 0}
    if bad:
        report("workers exited with errors: " + ", ".join(f"{n}={c}" for n, c in bad.items()))
    return 1 if bad else 0
