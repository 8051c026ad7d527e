"""The loss probe: a task is lost only when the broker restarted and the task is nowhere, twice."""

from __future__ import annotations

from typing import Any

from dspex_tasks.lost import LossProbe


class _Pipe:
    def __init__(self, redis: _Redis) -> None:
        self.redis = redis
        self.calls: list[Any] = []

    def lrange(self, name: str, start: int, end: int) -> None:
        self.calls.append(self.redis.lists.get(name, []))

    def hvals(self, name: str) -> None:
        self.calls.append(list(self.redis.unacked.values()))

    def execute(self) -> list[Any]:
        return self.calls


class _Redis:
    def __init__(self) -> None:
        self.run_id = "a"
        self.lists: dict[str, list[bytes]] = {}
        self.unacked: dict[str, bytes] = {}
        self.infos = 0

    def info(self, section: str) -> dict[str, str]:
        self.infos += 1
        return {"run_id": self.run_id}

    def pipeline(self, transaction: bool = True) -> _Pipe:
        return _Pipe(self)


def _probe(redis: _Redis, results: set[str] | None = None) -> LossProbe:
    done = results or set()
    return LossProbe("t-1", "dspex.predict", broker=redis, run_id="a", result_exists=lambda t: t in done)


def test_same_server_is_never_a_loss_and_costs_one_info() -> None:
    redis = _Redis()
    probe = _probe(redis)
    assert not probe.lost(force=True) and not probe.lost(force=True) and redis.infos == 2


def test_restart_with_the_task_nowhere_is_a_loss_on_the_second_look() -> None:
    redis = _Redis()
    probe = _probe(redis)
    redis.run_id = "b"
    assert not probe.lost(force=True)
    assert probe.lost(force=True)
    assert "Redis lost its data" in probe.message() and "t-1" in probe.message()


def test_restart_with_the_task_queued_unacked_or_finished_is_not_a_loss() -> None:
    for where in ("queue", "unacked", "result"):
        redis = _Redis()
        if where == "queue":
            redis.lists["dspex.predict"] = [b'{"headers": {"id": "t-1"}}']
        elif where == "unacked":
            redis.unacked["tag"] = b'[{"headers": {"id": "t-1"}}, "", "dspex.predict"]'
        probe = _probe(redis, {"t-1"} if where == "result" else None)
        redis.run_id = "b"
        assert not probe.lost(force=True) and not probe.lost(force=True), where
        assert probe.run_id == "b"  # survived this restart: later checks are one INFO again


def test_checks_are_throttled_and_an_unreachable_redis_is_no_verdict() -> None:
    redis = _Redis()
    probe = _probe(redis)
    probe.lost(force=True)
    probe.lost()
    assert redis.infos == 1

    def down(section: str) -> dict[str, str]:
        raise ConnectionError("gone")

    redis.info = down  # type: ignore[method-assign]
    assert not probe.lost(force=True) and not probe.lost(force=True)
