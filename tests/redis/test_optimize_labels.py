"""Datasets as DSPy users have them: label fields of any name, dspy.Example rows and dumps (issue 16 item 3)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from dspex_tasks import errors
from dspex_tasks.optimize.metrics import _METRICS, metric
from dspex_tasks.testing.mockgen import rule_answer

pytestmark = pytest.mark.redis

SEEN: list[dict[str, Any]] = []


@pytest.fixture
def user_metric() -> Iterator[None]:
    """A user's metric, registered before the worker starts (workers publish the metric names they know)."""

    @metric("expected_answer_match")
    def expected_answer_match(example: Any, prediction: Any, trace: Any = None) -> bool:
        # what DSPy's tutorials write: the label is an attribute of the example, named as the user likes
        SEEN.append({"expected_answer": example.expected_answer, "source": example.source})
        return bool(prediction.answer == example.expected_answer)

    SEEN.clear()
    yield
    _METRICS.pop("expected_answer_match", None)


@pytest.fixture
def oclient(user_metric: None, opt_app: Any) -> Iterator[Any]:
    from dspex_tasks.client import Client

    c = Client(settings=opt_app.dspex_settings)
    yield c
    c.close()


def rows(n: int) -> list[dict[str, Any]]:
    # ``answer`` is the interface's output (labelled demos carry it); the other two are labels only the metric reads
    return [{"question": f"item {i}", "answer": rule_answer({"question": f"item {i}"}),
             "expected_answer": rule_answer({"question": f"item {i}"}), "source": {"page": i, "tags": ["wiki"]}}
            for i in range(n)]


def test_label_fields_of_any_name_reach_the_metric_and_win(oclient: Any) -> None:
    # Given rows with labels that are not interface fields (as in DSPy's MIPROv2 tutorial)
    summary = oclient.optimize("qa", rows(16), metric="expected_answer_match", session="lab",
                               params={"eval_chunk_size": 4}).get(timeout=60)
    # Then the metric saw them on the example, and the labels taught the program (demos help in this mock)
    assert {"expected_answer": rule_answer({"question": "item 3"}), "source": {"page": 3, "tags": ["wiki"]}} in SEEN
    assert summary["promoted"] is True and summary["score"] == 1.0 and summary["baseline_score"] == 0.0
    out = oclient.submit("qa", {"question": "new one"}, session="lab").get(timeout=20).outputs
    assert out["answer"] == rule_answer({"question": "new one"})


def test_dspy_examples_and_their_dumps_are_rows(oclient: Any) -> None:
    import dspy

    examples = [dspy.Example(**r).with_inputs("question") for r in rows(6)]
    # Given Example objects, their toDict() output and vars() dumps (json.dump(vars(ex), f, default=sorted))
    assert oclient.datasets.put("as_examples", examples) == 6
    assert oclient.datasets.put("as_dicts", json.loads(json.dumps([e.toDict() for e in examples]))) == 6
    assert oclient.datasets.put("as_vars", json.loads(json.dumps([vars(e) for e in examples], default=sorted))) == 6
    # Then each is stored as the plain rows, without DSPy's bookkeeping keys
    for name in ("as_examples", "as_dicts", "as_vars"):
        assert oclient.datasets.get(name) == rows(6), name
    # And a run reads them as any dataset
    summary = oclient.optimize("qa", dataset="as_vars", metric="expected_answer_match",
                               params={"eval_chunk_size": 4}).get(timeout=60)
    assert summary["dry_run"] is True and summary["score"] == 1.0


def test_only_inputs_are_checked_and_a_bad_stored_dataset_fails_at_optimize(oclient: Any) -> None:
    # Labels may be any JSON; an input of the wrong type is named by index and field
    oclient.datasets.put("bad_input", [*rows(3), {"question": {"not": "text"}, "expected_answer": "x"}])
    ok = oclient.optimize("qa", [{"question": "q", "expected_answer": None, "extra": [1, {"a": 2}]}] * 3,
                          metric="expected_answer_match")  # labels of any shape, no interface output at all
    with pytest.raises(errors.ValidationError) as info:
        oclient.optimize("qa", dataset="bad_input", metric="expected_answer_match", session="lab2")
    assert info.value.errors[0]["field"] == "dataset.3.question", info.value.errors
    assert oclient.runs.ids() == [ok.id]
