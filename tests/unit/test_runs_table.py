"""``dspex runs ls``: the table fits 80 columns, with every run id whole on one line."""

from __future__ import annotations

import uuid

import pytest
from rich.console import Console

from dspex_tasks.cli.optimize import runs_table
from dspex_tasks.optimize.runs import RunRecord, RunStatus

pytestmark = pytest.mark.unit

NOW = 1_700_000_000.0


def record(status: RunStatus, **kw: object) -> RunRecord:
    base: dict[str, object] = {"run_id": uuid.uuid4().hex, "status": status, "stage": "done",
                               "created_at": NOW - 3600, "signature": "qa", "session": "tenant-42", "program": "qa",
                               "optimizer": "bootstrap_few_shot", "metric": "exact_match"}
    return RunRecord(**{**base, **kw})  # type: ignore[arg-type]


RECORDS = [
    record(RunStatus.SUCCEEDED, signature="complex_analysis", program="complex_analysis_experimental_v2",
           optimizer="bootstrap_few_shot_with_random_search", baseline_score=0.25, candidate_score=0.75,
           summary={"promoted": True, "score": 0.75}, lm_calls=1234, started_at=NOW - 3600, finished_at=NOW - 3000),
    record(RunStatus.SUCCEEDED, session="", optimizer="miprov2", baseline_score=0.5, candidate_score=0.625,
           summary={"promoted": False, "dry_run": True, "score": 0.625}, created_at=NOW - 42),
    record(RunStatus.SUCCEEDED, baseline_score=0.5, candidate_score=0.5, summary={"promoted": False, "score": 0.5}),
    record(RunStatus.RUNNING, stage="compile", baseline_score=0.5, created_at=NOW - 300),
    record(RunStatus.FAILED, stage="failed", created_at=NOW - 3 * 86400, error={"type": "LMError", "args": ["x"]}),
]


def render(width: int) -> list[str]:
    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    console.print(runs_table(RECORDS, now=NOW, width=width))
    return console.export_text().splitlines()


def test_runs_ls_fits_80_columns_with_whole_run_ids() -> None:
    lines = render(80)
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    for rec in RECORDS:
        assert any(rec.run_id in line for line in lines), rec.run_id  # whole, on one line: copyable
    text = "\n".join(lines)
    for expected in ("succeeded", "running", "failed", "promoted", "dry run", "unchanged", "0.25→0.75",
                     "0.50→0.62", "0.50→-", "42s", "5m", "3d", "miprov2", "bootstrap_few_shot"):
        assert expected in text, expected
    assert "tenant-42" not in text  # the session column joins only on wide terminals


def test_wide_terminals_show_session_lm_calls_and_duration() -> None:
    lines = render(160)
    assert max(len(line) for line in lines) <= 160
    text = "\n".join(lines)
    assert "tenant-42" in text and "1234" in text and "600.0 s" in text
    assert "complex_analysis/complex_analysis_experimental_v2" in text
