"""Typed tasks end to end on a real Redis with an in-process worker."""

from __future__ import annotations

import time
from typing import Any

import pytest

from dspex_tasks import errors
from dspex_tasks.client import Job

pytestmark = pytest.mark.redis


def queue_depth(client: Any) -> int:
    return int(client.redis.llen(client.settings.predict_queue))


def test_submit_returns_typed_validated_result(client: Any, signatures: Any) -> None:
    # Given a warm worker, when a prediction is submitted
    res = client.submit("complex_analysis", {"text": "Ada met Alan in London.", "context": ["1843"]},
                        session="t42").get(timeout=20)
    # Then its outputs fit the signature and the result names what served it
    sig = signatures.get("complex_analysis")
    assert sig.validate_outputs(res.outputs) == res.outputs
    assert 0 <= res.outputs["confidence"] <= 1
    assert res.session == "t42" and res.program == "complex_analysis" and res.program_version == 0
    assert res.usage["total_tokens"] > 0 and res.lm == "mock/dspex" and res.duration_ms > 0


def test_same_inputs_same_outputs_other_inputs_other_outputs(client: Any) -> None:
    a = client.submit("qa", {"question": "one"}).get(timeout=20).outputs
    b = client.submit("qa", {"question": "one"}).get(timeout=20).outputs
    c = client.submit("qa", {"question": "two"}).get(timeout=20).outputs
    assert a == b and a != c


def test_program_put_and_rollback_change_the_served_version(client: Any) -> None:
    assert client.submit("qa", {"question": "q"}, session="s1").get(timeout=20).program_version == 0
    demos = [{"question": "2+2?", "answer": "4", "confidence": 0.9}]
    v1 = client.programs.put("s1", "qa", {"demos": demos, "instructions": "Be terse."}, signature="qa")
    v2 = client.programs.put("s1", "qa", {"demos": demos * 2}, signature="qa")
    deadline = time.time() + 1.5
    while client.submit("qa", {"question": "q"}, session="s1").get(timeout=20).program_version != v2:
        assert time.time() < deadline, "new version not served within the bound"
    client.programs.rollback("s1", "qa", v1)
    deadline = time.time() + 1.5
    while client.submit("qa", {"question": "q"}, session="s1").get(timeout=20).program_version != v1:
        assert time.time() < deadline, "rollback not served within the bound"
    # another session is untouched
    assert client.submit("qa", {"question": "q"}, session="s2").get(timeout=20).program_version == 0


def test_client_rejects_before_enqueueing(client: Any) -> None:
    with pytest.raises(errors.UnknownSignature, match="nope"):
        client.submit("nope", {"question": "q"})
    with pytest.raises(errors.ValidationError) as info:
        client.submit("qa", {"question": 3, "extra": 1})
    assert {e["field"] for e in info.value.errors} == {"question", "extra"}
    with pytest.raises(errors.ValidationError) as info:
        client.submit("complex_analysis", {"text": "t"})
    assert info.value.errors[0]["field"] == "context"
    with pytest.raises(errors.InvalidSession):
        client.submit("qa", {"question": "q"}, session="bad session")
    assert queue_depth(client) == 0


def test_nested_error_paths_from_the_client(client: Any) -> None:
    with pytest.raises(errors.ValidationError) as info:
        client.submit("complex_analysis", {"text": "t", "context": ["a", "b", 3]})
    assert info.value.errors[0]["field"] == "context.2"


def test_raw_send_task_with_bad_kwargs_fails_clearly(worker_app: Any) -> None:
    # Given a client that skips validation, when the worker gets bad kwargs, then the job fails typed
    r = worker_app.send_task("dspex.qa", kwargs={"inputs": {"question": 1}, "session": "s1"})
    with pytest.raises(errors.ValidationError) as info:
        Job(r).get(timeout=20)
    assert info.value.errors[0]["field"] == "question"
    r = worker_app.send_task("dspex.qa", kwargs={"inputs": {"question": "q"}, "sesion": "s1"})
    with pytest.raises(errors.ValidationError, match="sesion"):
        Job(r).get(timeout=20)
    r = worker_app.send_task("dspex.qa", kwargs={"inputs": {"question": "q"}, "session": "a b"})
    with pytest.raises(errors.InvalidSession):
        Job(r).get(timeout=20)
    r = worker_app.send_task("dspex.qa", kwargs={"inputs": "not an object"})
    with pytest.raises(errors.ValidationError, match="expected an object"):
        Job(r).get(timeout=20)


def test_payload_cap_on_the_worker(worker_app: Any) -> None:
    big = "x" * (worker_app.dspex_settings.max_payload_bytes + 10)
    r = worker_app.send_task("dspex.qa", kwargs={"inputs": {"question": big}})
    with pytest.raises(errors.ValidationError, match="payload limit"):
        Job(r).get(timeout=20)


def test_map_returns_results_in_input_order(client: Any) -> None:
    inputs = [{"question": f"question {i}"} for i in range(150)]
    results = client.map("qa", inputs, session="m1", chunk_size=16)
    assert len(results) == 150
    singles = [client.submit("qa", inputs[i], session="m1").get(timeout=20).outputs for i in (0, 77, 149)]
    assert [results[i].outputs for i in (0, 77, 149)] == singles


def test_map_validates_every_item_first(client: Any) -> None:
    with pytest.raises(errors.ValidationError) as info:
        client.map("qa", [{"question": "ok"}, {"question": 2}])
    assert info.value.errors[0]["field"] == "1.question"
    assert queue_depth(client) == 0


def test_signatures_are_published(client: Any) -> None:
    sigs = client.signatures(refresh=True)
    assert set(sigs) == {"qa", "complex_analysis"}
    assert sigs["qa"]["output_schema"]["properties"]["confidence"] == {"type": "number", "minimum": 0, "maximum": 1}
