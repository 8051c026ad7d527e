"""The promotion gate on a real Redis with an in-process worker: a lucky small-sample win is refused.

The ``learns_from_demos`` mock answers every question by rule once the prompt holds demos, and with
hash-derived text without them. A validation row labelled by the rule is one the candidate gets right and
the baseline wrong; a row labelled ``unreachable-*`` neither gets right. So each example's outcome, and
the gain, is fixed by the data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dspex_tasks.testing.mockgen import rule_answer

pytestmark = pytest.mark.redis


def labelled(n: int, prefix: str = "question") -> list[dict[str, Any]]:
    return [{"question": f"{prefix} {i}", "answer": rule_answer({"question": f"{prefix} {i}"})} for i in range(n)]


def unreachable(n: int, prefix: str = "hard") -> list[dict[str, Any]]:
    return [{"question": f"{prefix} {i}", "answer": f"unreachable-{i}"} for i in range(n)]


@pytest.fixture
def oclient(opt_app: Any) -> Iterator[Any]:
    from dspex_tasks.client import Client

    c = Client(settings=opt_app.dspex_settings)
    yield c
    c.close()


def test_a_lucky_small_sample_win_is_refused_when_confidence_is_required(oclient: Any) -> None:
    # Given a valset of three where demos fix only the first example: the candidate wins 1 of 3
    train, val = labelled(8), labelled(1, "val") + unreachable(2)
    params = {"eval_chunk_size": 2, "max_bootstrapped_demos": 2}  # two chunks: scores pair across them

    # When one run requires the gain's 95% interval and another, on the same data, does not
    required = oclient.optimize("qa", train, val, session="g1", params={**params, "confidence": 0.95})
    reported = oclient.optimize("qa", train, val, session="g2", params=params)
    strict, plain = required.get(timeout=60), reported.get(timeout=60)

    # Then both see the same win (+1/3) and the same interval, [0, 1]: one example in three could be luck
    for summary in (strict, plain):
        assert summary["baseline_score"] == 0.0 and summary["score"] == pytest.approx(1 / 3)
        assert summary["gain"] == pytest.approx(1 / 3) and summary["gain_ci"] == [0.0, 1.0]
        assert summary["confidence"] == 0.95 and summary["n_val"] == 3
    # the per-example scores the gate paired, in validation-row order
    assert oclient.runs.checkpoint(required.id, "eval:baseline")["scores"] == [0.0, 0.0, 0.0]
    assert oclient.runs.checkpoint(required.id, "eval:candidate")["scores"] == [1.0, 0.0, 0.0]
    # And the run requiring confidence is not promoted, naming the interval; the other is promoted
    assert strict["promoted"] is False and strict["confidence_required"] is True
    assert "95% interval [0.0000, 1.0000] over 3 examples does not lie above" in strict["reason"], strict["reason"]
    assert oclient.programs.history("g1", "qa") == []
    assert plain["promoted"] is True and plain["confidence_required"] is False and "beat baseline" in plain["reason"]
    assert oclient.programs.history("g2", "qa") == [1]


def test_a_consistent_win_clears_the_required_interval(oclient: Any) -> None:
    # Given a valset where demos fix every example
    run = oclient.optimize("qa", labelled(8), labelled(6, "val"), session="g3",
                           params={"eval_chunk_size": 4, "max_bootstrapped_demos": 2, "confidence": 0.95})
    summary = run.get(timeout=60)
    # Then the interval is the gain itself, above min_gain: promoted, and the reason says why
    assert summary["gain"] == 1.0 and summary["gain_ci"] == [1.0, 1.0] and summary["n_val"] == 6
    assert summary["promoted"] is True and summary["program_version"] == 1
    assert "95% interval [1.0000, 1.0000] over 6 examples lies above min_gain" in summary["reason"]


def test_confidence_out_of_range_is_refused_before_anything_runs(oclient: Any) -> None:
    from dspex_tasks import errors

    with pytest.raises(errors.ValidationError) as info:
        oclient.optimize("qa", labelled(6), session="g4", params={"confidence": 1.2})
    assert info.value.errors[0]["field"] == "params.confidence"
    assert oclient.runs.ids() == []
