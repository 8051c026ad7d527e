"""DSPEX_TASK_EVENTS: workers send Celery's task events (Flower's view) unless it is off."""

from __future__ import annotations

import pytest

from dspex_tasks.app import create_app
from dspex_tasks.settings import Settings, load_settings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("raw", "expected"), [(None, True), ("0", False), ("1", True)])
def test_task_events_follow_the_setting(monkeypatch: pytest.MonkeyPatch, raw: str | None, expected: bool) -> None:
    if raw is None:
        monkeypatch.delenv("DSPEX_TASK_EVENTS", raising=False)
    else:
        monkeypatch.setenv("DSPEX_TASK_EVENTS", raw)
    settings = load_settings()
    assert settings.task_events is expected
    app = create_app(settings)
    try:
        assert app.conf.worker_send_task_events is expected
    finally:
        app.close()


def test_a_bad_value_names_the_setting() -> None:
    with pytest.raises(Exception, match="task_events"):
        Settings(task_events="sometimes")  # type: ignore[arg-type]
