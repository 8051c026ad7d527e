"""``plots.plot_run``: a PNG of a run's trials and score over time, without Redis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dspex_tasks.optimize.plots import plot_run

pytestmark = pytest.mark.unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
T0 = 1_700_000_000.0


def events() -> list[dict[str, Any]]:
    return [
        {"stage": "queued", "done": 0, "total": None, "ts": T0, "message": "bootstrap_few_shot on qa"},
        {"stage": "load", "done": 1, "total": 1, "ts": T0 + 0.2},
        {"stage": "baseline", "done": 0, "total": 8, "ts": T0 + 0.3},
        {"stage": "baseline", "done": 8, "total": 8, "score": 0.25, "lm_calls": 8, "ts": T0 + 1.1},
        {"stage": "compile", "done": 5, "total": 20, "ts": T0 + 1.6},
        {"stage": "compile", "done": 1, "total": 1, "lm_calls": 30, "ts": T0 + 2.4},
        {"stage": "candidate", "done": 8, "total": 8, "score": 0.875, "lm_calls": 38, "ts": T0 + 3.0},
        {"stage": "done", "done": 1, "total": 1, "score": 0.875, "ts": T0 + 3.1, "promoted": True},
    ]


def record(**summary: Any) -> dict[str, Any]:
    return {"run_id": "0123456789abcdef", "signature": "qa", "session": "s1", "optimizer": "bootstrap_few_shot",
            "status": "succeeded", "created_at": T0, "baseline_score": 0.25, "candidate_score": 0.875,
            "summary": {"baseline_score": 0.25, "score": 0.875, "promoted": True, **summary}}


def assert_png(path: Path, min_kb: int) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_kb * 1024


def test_plot_with_trials_and_events_writes_a_png(tmp_path: Path) -> None:
    # Given a finished run with trial scores, when it is plotted into a directory that does not exist yet
    out = plot_run(record(trials=[0.25, 0.5, 0.875, 0.75]), events(), tmp_path / "plots" / "run.png")
    # Then a real (two-panel) PNG is written there
    assert out == tmp_path / "plots" / "run.png"
    assert_png(out, 40)


def test_plot_without_trials_writes_a_smaller_png(tmp_path: Path) -> None:
    with_trials = plot_run(record(trials=[0.25, 0.875]), events(), tmp_path / "a.png")
    without = plot_run(record(trials=[]), events(), tmp_path / "b.png")
    assert_png(without, 20)
    assert without.stat().st_size < with_trials.stat().st_size  # one panel instead of two


def test_plot_of_a_run_without_summary_or_scores(tmp_path: Path) -> None:
    # a run still in its first stages: no summary, no score yet, odd values ignored
    rec = {"run_id": "r1", "signature": "qa", "optimizer": "miprov2", "status": "running", "best_score": None}
    evs = [{"stage": "queued", "done": 0, "total": None, "ts": T0},
           {"stage": "load", "done": 1, "total": 1, "ts": T0 + 0.5, "score": "n/a"}]
    assert_png(plot_run(rec, evs, tmp_path / "running.png"), 10)
    assert_png(plot_run(rec, [], tmp_path / "empty.png"), 10)
