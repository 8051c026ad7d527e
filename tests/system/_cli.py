"""Helpers for the CLI system tests: where the CLI points, and finding processes a command left behind."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests._procs import worker_env

__all__ = ["CliTarget", "Dspex", "command_line", "processes_with_env", "wait_until_gone"]


@dataclass(frozen=True)
class CliTarget:
    """Where the CLI under test points: one Redis, a namespace and a predict queue of its own."""

    redis_url: str
    namespace: str
    queue: str

    def env(self, **extra: str) -> dict[str, str]:
        # A wide terminal, so rich tables do not wrap the values the tests look for.
        return worker_env(self.redis_url, self.namespace, DSPEX_PREDICT_QUEUE=self.queue, COLUMNS="200", **extra)


Dspex = Callable[..., subprocess.CompletedProcess[str]]


def command_line(pid: int) -> str | None:
    """The command line of a live process, or None when it is gone (zombies count as gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or None


def processes_with_env(entry: str) -> list[tuple[int, str]]:
    """Live processes whose environment holds ``entry`` (``NAME=value``), as (pid, command line).

    Environment is inherited by every descendant, so a unique variable finds the processes a
    command started (not redis-server: it rewrites its title over its environment block).
    """
    needle = entry.encode()
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            found.append((int(pid), cmdline.replace(b"\0", b" ").decode(errors="replace").strip()))
    return found


def wait_until_gone(entry: str, timeout_s: float = 10.0) -> list[tuple[int, str]]:
    """Poll until no process carries ``entry``; returns what is still there at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = processes_with_env(entry)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)
