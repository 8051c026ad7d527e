"""The promotion gate's paired bootstrap (``optimize.gate``) and what runs changed (``optimize.compare``)."""

from __future__ import annotations

import math
import random
import statistics
import time

import pytest

from dspex_tasks.errors import ValidationError
from dspex_tasks.optimize.compare import change_cells, compare_rows, predictor_changes, run_scores, shorten
from dspex_tasks.optimize.gate import decide, paired_bootstrap
from dspex_tasks.optimize.optimizers import parse_common

pytestmark = pytest.mark.unit


# -- the interval ---------------------------------------------------------------------------------
def test_identical_scores_give_a_zero_interval() -> None:
    scores = [0.0, 1.0, 0.5, 1.0, 0.0, 0.25]
    assert paired_bootstrap(scores, list(scores)) == (0.0, 0.0)
    assert paired_bootstrap([1.0] * 4, [1.0] * 4, confidence=0.99, seed=7) == (0.0, 0.0)


def test_a_consistent_gain_gives_an_interval_above_zero() -> None:
    # the candidate is better on half of 40 examples and never worse
    baseline = [0.0] * 40
    candidate = [1.0, 0.0] * 20
    lo, hi = paired_bootstrap(baseline, candidate)
    assert 0.2 < lo < 0.5 < hi < 0.8
    # the same gain on every example: the interval is that gain
    assert paired_bootstrap([0.0, 0.5], [0.25, 0.75]) == (0.25, 0.25)


def test_a_reproducible_seed() -> None:
    rng = random.Random(3)
    baseline = [rng.random() for _ in range(50)]
    candidate = [b + rng.gauss(0.05, 0.2) for b in baseline]
    first = paired_bootstrap(baseline, candidate, seed=11)
    assert paired_bootstrap(baseline, candidate, seed=11) == first
    assert paired_bootstrap(baseline, candidate, seed=12) != first


def test_percentiles_of_a_three_example_win() -> None:
    # gains [1, 0, 0]: a resample's mean is 0 with p 8/27, 1 with p 1/27 (both above a 2.5% tail)
    assert paired_bootstrap([0, 0, 0], [1, 0, 0], confidence=0.95) == (0.0, 1.0)
    # at 90% the upper tail is 5%, which the 1/27 of all-wins (3.7%) falls inside
    assert paired_bootstrap([0, 0, 0], [1, 0, 0], confidence=0.90) == (0.0, pytest.approx(2 / 3))


def test_interval_agrees_with_the_normal_approximation_for_many_examples() -> None:
    rng = random.Random(5)
    diffs = [rng.gauss(0.1, 0.3) for _ in range(400)]
    lo, hi = paired_bootstrap([0.0] * 400, diffs, resamples=4000)
    mean, half = statistics.fmean(diffs), 1.96 * statistics.stdev(diffs) / math.sqrt(400)
    assert lo == pytest.approx(mean - half, abs=0.006) and hi == pytest.approx(mean + half, abs=0.006)
    narrow = paired_bootstrap([0.0] * 400, diffs, confidence=0.8, resamples=4000)
    assert lo < narrow[0] < mean < narrow[1] < hi


def test_fast_enough_for_a_large_valset() -> None:
    rng = random.Random(1)
    baseline = [float(rng.random() < 0.5) for _ in range(1000)]
    candidate = [float(rng.random() < 0.6) for _ in range(1000)]
    start = time.perf_counter()
    paired_bootstrap(baseline, candidate, resamples=2000)
    assert time.perf_counter() - start < 3.0


def test_unpaired_or_empty_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="unpaired"):
        paired_bootstrap([0, 1], [1])
    with pytest.raises(ValueError, match="no examples"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([0], [1], confidence=1.0)


# -- the decision ----------------------------------------------------------------------------------
def test_a_lucky_small_sample_win_is_refused_only_when_confidence_is_required() -> None:
    base, cand = [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]
    required = decide(0.0, 1 / 3, base, cand, min_gain=1e-9, confidence=0.95, seed=0)
    assert required.passed is False and required.gain_ci == (0.0, 1.0)
    assert "95% interval [0.0000, 1.0000] over 3 examples" in required.reason and "noise" in required.reason
    reported = decide(0.0, 1 / 3, base, cand, min_gain=1e-9, seed=0)
    assert reported.passed is True and "beat baseline" in reported.reason
    assert reported.summary() == {"gain": pytest.approx(1 / 3), "gain_ci": [0.0, 1.0], "confidence": 0.95,
                                  "confidence_required": False, "n_val": 3, "min_gain": 1e-9}


def test_a_gain_that_clears_the_interval_passes_and_says_so() -> None:
    gate = decide(0.0, 1.0, [0.0] * 5, [1.0] * 5, min_gain=0.1, confidence=0.99)
    assert gate.passed is True and gate.gain_ci == (1.0, 1.0)
    assert "99% interval [1.0000, 1.0000] over 5 examples lies above min_gain 0.1" in gate.reason


def test_a_gain_below_min_gain_fails_whatever_the_interval() -> None:
    gate = decide(0.5, 0.5, [1.0, 0.0], [1.0, 0.0], min_gain=1e-9, confidence=0.9)
    assert gate.passed is False and "< min_gain" in gate.reason and "90% interval" in gate.reason
    # not required: the old reason, unchanged
    assert decide(0.5, 0.5, [1.0, 0.0], [1.0, 0.0], min_gain=1e-9).reason == (
        "candidate 0.5000 vs baseline 0.5000: gain 0.0000 < min_gain 1e-09")


def test_a_required_interval_without_paired_scores_refuses() -> None:
    gate = decide(0.0, 1.0, None, [1.0, 1.0], min_gain=0.0, confidence=0.95)
    assert gate.passed is False and gate.gain_ci is None and gate.n_val == 0 and "no paired" in gate.reason
    assert decide(0.0, 1.0, [0.0], [1.0, 1.0], min_gain=0.0).passed is True  # not required: gain alone


def test_confidence_param_bounds() -> None:
    assert parse_common({}).confidence is None and parse_common({}).bootstrap_resamples == 2000
    assert parse_common({"confidence": 0.95}).confidence == 0.95
    for bad in (0.5, 1, 1.5, "high"):
        with pytest.raises(ValidationError) as info:
            parse_common({"confidence": bad})
        assert info.value.errors[0]["field"] == "params.confidence"
    with pytest.raises(ValidationError):
        parse_common({"bootstrap_resamples": 10})


# -- what a run changed, runs side by side -----------------------------------------------------------
DEMO = {"question": "q", "answer": "a"}


def test_changes_from_the_program_defaults_to_a_predict_candidate() -> None:
    candidate = {"traces": [], "train": [], "demos": [DEMO] * 3,
                 "signature": {"instructions": "Answer the question.", "fields": []}}
    [change] = predictor_changes(None, candidate)
    assert change.to_json() == {"predictor": "self", "demos": [0, 3], "instructions": [None, "Answer the question."],
                                "instructions_changed": None}
    [known] = predictor_changes(None, candidate, default_instructions="Answer  the question.")
    assert known.instructions_changed is False
    assert change_cells(known.to_json()) == ("0 → 3", "unchanged: Answer the question.")


def test_changes_pair_a_short_form_baseline_with_a_chain_of_thought_candidate() -> None:
    baseline = {"demos": [DEMO], "instructions": "Be brief."}
    candidate = {"predict": {"demos": [DEMO] * 4, "signature": {"instructions": "Think, then answer in one word."}}}
    [change] = predictor_changes(baseline, candidate)
    assert (change.predictor, change.demos_before, change.demos_after) == ("predict", 1, 4)
    assert change.instructions_changed is True
    assert change_cells(change.to_json(), limit=20) == ("1 → 4", "Be brief. → Think, then answer…")


def test_changes_of_several_predictors_each_their_own() -> None:
    baseline = {"retrieve": {"demos": []}, "answer": {"demos": [DEMO], "signature": {"instructions": "Old."}},
                "metadata": {"dependency_versions": {}}}
    candidate = {"answer": {"demos": [DEMO] * 2, "signature": {"instructions": "New."}},
                 "retrieve": {"demos": [DEMO], "signature": {"instructions": "Find."}}}
    got = {c.predictor: c.to_json() for c in predictor_changes(baseline, candidate, default_instructions="x")}
    assert list(got) == ["answer", "retrieve"]  # the candidate's order; the default is not applied to several
    assert got["answer"]["demos"] == [1, 2] and got["answer"]["instructions"] == ["Old.", "New."]
    assert got["retrieve"]["demos"] == [0, 1] and got["retrieve"]["instructions"] == [None, "Find."]


def test_shorten() -> None:
    assert shorten(None) == "(default)"
    assert shorten("a\n  b") == "a b"
    assert shorten("x" * 100, 10) == "x" * 9 + "…"


def test_run_scores_of_new_and_older_summaries_side_by_side() -> None:
    new = {"run_id": "a" * 32, "status": "succeeded", "signature": "qa", "optimizer": "bootstrap_few_shot",
           "metric": "exact_match", "lm_calls": 9, "summary": {
               "baseline_score": 0.0, "score": 1 / 3, "gain": 1 / 3, "gain_ci": [0.0, 1.0], "confidence": 0.95,
               "confidence_required": True, "n_val": 3, "promoted": False, "lm_calls": 12, "duration_s": 2.5,
               "trials": [0.1, 0.2]}}
    old = {"run_id": "b" * 32, "status": "succeeded", "optimizer": "miprov2", "metric": "f1", "started_at": 10.0,
           "finished_at": 14.0, "summary": {"baseline_score": 0.5, "score": 0.75, "promoted": True, "lm_calls": 3}}
    running = {"run_id": "c" * 32, "status": "running", "optimizer": "x", "metric": "y", "baseline_score": 0.25}
    rows = [run_scores(r) for r in (new, old, running)]
    assert rows[0]["gain"] == pytest.approx(1 / 3) and rows[0]["trials"] == 2 and rows[0]["lm_calls"] == 12
    assert rows[1]["gain"] == 0.25 and rows[1]["gain_ci"] is None and rows[1]["duration_s"] == 4.0
    assert rows[2]["candidate"] is None and rows[2]["gain"] is None
    table = dict(compare_rows(rows))
    assert table["gain"] == ["+0.333", "+0.250", "-"]
    assert table["gain interval"] == ["[+0.000, +1.000] at 95%, required", "-", "-"]
    assert table["promoted"] == ["no", "yes", "-"] and table["duration"] == ["2.5 s", "4.0 s", "-"]
    assert table["trials"] == ["2", "-", "-"] and table["optimizer"] == ["bootstrap_few_shot", "miprov2", "x"]
