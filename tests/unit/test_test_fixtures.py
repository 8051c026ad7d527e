"""The test fixtures' own rules: parallel pytest-xdist processes never share (and flush) one Redis DB."""

from __future__ import annotations

import pytest

from dspex_tasks.testing.fixtures import _per_xdist_worker

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("worker", "expected"), [("", "redis://h:6379/13"), ("master", "redis://h:6379/13"),
                                                  ("gw0", "redis://h:6379/13"), ("gw2", "redis://h:6379/15")])
def test_each_xdist_process_gets_its_own_db(monkeypatch: pytest.MonkeyPatch, worker: str, expected: str) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    assert _per_xdist_worker("redis://h:6379/13") == expected


def test_a_url_without_a_db_number_is_refused_under_xdist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    with pytest.raises(pytest.UsageError, match="must end in a DB number"):
        _per_xdist_worker("redis://h:6379/x")
