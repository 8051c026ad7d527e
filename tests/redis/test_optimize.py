"""Optimization runs on a real Redis with an in-process worker serving both queues."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dspex_tasks import errors
from dspex_tasks.optimize.runs import RunStore
from dspex_tasks.testing.mockgen import rule_answer

RUN_ID = "0123456789abcdef" * 2  # run ids are 32 lowercase hex characters

pytestmark = pytest.mark.redis


def labelled(n: int, prefix: str = "question") -> list[dict[str, Any]]:
    return [{"question": f"{prefix} {i}", "answer": rule_answer({"question": f"{prefix} {i}"})} for i in range(n)]


@pytest.fixture
def oclient(opt_app: Any) -> Iterator[Any]:
    from dspex_tasks.client import Client

    c = Client(settings=opt_app.dspex_settings)
    yield c
    c.close()


def test_run_promotes_and_next_prediction_serves_new_version(oclient: Any) -> None:
    # Given a session serving the base program
    assert oclient.submit("qa", {"question": "abc"}, session="s1").get(timeout=20).program_version == 0
    # When a run whose demos help the metric finishes
    run = oclient.optimize("qa", labelled(24), metric="exact_match", optimizer="bootstrap_few_shot", session="s1",
                           params={"eval_chunk_size": 4})
    summary = run.get(timeout=60)
    # Then it is promoted, says why, and the session serves the new version with the learned behaviour
    assert summary["promoted"] is True and summary["score"] > summary["baseline_score"]
    assert "beat baseline" in summary["reason"] and summary["lm_calls"] > 0
    assert summary["program_version"] == 1 == oclient.programs.current_version("s1", "qa")
    deadline = time.time() + 2
    while (res := oclient.submit("qa", {"question": "abc"}, session="s1").get(timeout=20)).program_version != 1:
        assert time.time() < deadline
    assert res.outputs["answer"] == rule_answer({"question": "abc"})


def test_run_that_cannot_improve_is_not_promoted(oclient: Any) -> None:
    # labels no program can reach: the metric stays 0 for baseline and candidate
    rows = [{"question": f"q{i}", "answer": f"unreachable-{i}"} for i in range(12)]
    summary = oclient.optimize("qa", rows, session="s2", params={"eval_chunk_size": 3}).get(timeout=60)
    assert summary["promoted"] is False and "min_gain" in summary["reason"]
    assert oclient.programs.history("s2", "qa") == []


def test_events_in_order_and_replay_for_late_follower(oclient: Any) -> None:
    run = oclient.optimize("qa", labelled(16), session="s3", params={"eval_chunk_size": 4})
    first = list(run.events(timeout=60))
    stages = [e["stage"] for e in first]
    order = ["queued", "load", "baseline", "compile", "candidate", "done"]
    assert [s for s in dict.fromkeys(stages)] == order
    assert all(a["ts"] <= b["ts"] for a, b in zip(first, first[1:], strict=False))
    assert first[-1]["stage"] == "done" and "score" in first[-1]
    # a late follower replays the same events from the start, and two followers agree
    assert list(run.events(timeout=5)) == first
    assert list(oclient.run(run.id).events(timeout=5)) == first


def test_cancel_stops_at_a_stage_boundary_and_leaves_program(oclient: Any, opt_app: Any) -> None:
    oclient.programs.put("s4", "qa", {"demos": []}, signature="qa")
    run = oclient.optimize("qa", labelled(40), session="s4", params={"eval_chunk_size": 2})
    run.cancel()
    with pytest.raises(errors.DspexError, match="cancelled"):
        run.get(timeout=60)
    assert run.status()["status"] == "cancelled"
    assert oclient.programs.history("s4", "qa") == [1]
    assert list(run.events(timeout=5))[-1]["stage"] == "cancelled"


def test_bad_rows_are_reported_by_index_and_field_before_anything_runs(oclient: Any) -> None:
    rows = labelled(5)
    rows[3] = {"question": 7, "answer": "x"}
    with pytest.raises(errors.ValidationError) as info:
        oclient.optimize("qa", rows, session="s5")
    assert info.value.errors[0]["field"] == "trainset.3.question"
    with pytest.raises(errors.ValidationError) as info:
        oclient.optimize("qa", [{"answer": "a label without its input"}] * 3, session="s5")
    assert info.value.errors[0]["field"] == "trainset.0.question" and "required" in info.value.errors[0]["message"]
    with pytest.raises(errors.ValidationError) as info:
        oclient.optimize("qa", [{"question": "q", "answer": "a"}] * 3, valset=[{"question": ["not", "text"]}])
    assert info.value.errors[0]["field"] == "valset.0.question"
    with pytest.raises(errors.ValidationError, match="unknown metric"):
        oclient.optimize("qa", labelled(4), metric="nope", session="s5")
    with pytest.raises(errors.ValidationError, match="unknown optimizer"):
        oclient.optimize("qa", labelled(4), optimizer="nope", session="s5")
    assert oclient.runs.ids() == []


def test_bad_params_are_refused_before_anything_is_enqueued(oclient: Any) -> None:
    # Given workers that published each optimizer's params schema
    cases = [("miprov2", {"minibatch": False}, "params.minibatch", "unknown param 'minibatch'"),
             ("bootstrap_few_shot", {"max_bootstrapped_demos": "x"}, "params.max_bootstrapped_demos", "integer"),
             ("bootstrap_few_shot", {"max_bootstraped_demos": 2}, "params.max_bootstraped_demos",
              "did you mean 'max_bootstrapped_demos'?"),
             ("bootstrap_few_shot", {"eval_chunk_size": 0}, "params.eval_chunk_size", "minimum")]
    for optimizer, params, field, words in cases:
        # When a run is started with params its optimizer refuses
        with pytest.raises(errors.ValidationError) as info:
            oclient.optimize("qa", labelled(6), session="s6", optimizer=optimizer, params=params)
        # Then optimize() itself raises, naming the field, and nothing was recorded or enqueued
        assert info.value.errors[0]["field"] == field and words in info.value.errors[0]["message"], info.value
    assert oclient.runs.ids() == []
    assert oclient.programs.history("s6", "qa") == []


def test_custom_optimizer_params_are_checked_from_what_workers_publish(oclient: Any, opt_app: Any) -> None:
    import pydantic

    from dspex_tasks.optimize import optimizers
    from dspex_tasks.worker.runtime import publish_signatures

    class Params(pydantic.BaseModel):
        rounds: int = pydantic.Field(1, ge=1)

    sigs = [opt_app.dspex_signatures.get("qa")]
    optimizers.register(optimizers.Optimizer("custom_test", Params, lambda *a: (None, []), lambda *a: 0))
    try:
        publish_signatures(oclient.redis, oclient.settings.namespace, sigs)  # what a worker with it publishes
        with pytest.raises(errors.ValidationError) as info:
            oclient.optimize("qa", labelled(4), optimizer="custom_test", params={"round": 2})
        assert info.value.errors[0]["field"] == "params.round" and "did you mean 'rounds'?" in str(info.value)
    finally:
        del optimizers._REGISTRY["custom_test"]
        publish_signatures(oclient.redis, oclient.settings.namespace, sigs)
    assert oclient.runs.ids() == []


def test_without_published_params_schemas_params_are_still_checked(oclient: Any, opt_app: Any) -> None:
    # Given workers that publish no params schemas (older ones), one of them with a user's own optimizer
    import pydantic

    from dspex_tasks import keys
    from dspex_tasks.optimize import optimizers
    from dspex_tasks.worker.runtime import publish_signatures

    class Params(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        rounds: int = pydantic.Field(1, ge=1)

    optimizers.register(optimizers.Optimizer("custom_unpublished", Params, lambda *a: (None, []), lambda *a: 0))
    publish_signatures(oclient.redis, oclient.settings.namespace, [opt_app.dspex_signatures.get("qa")])
    assert oclient.redis.hdel(keys.capabilities(oclient.settings.namespace), "optimizer_params") == 1
    # Then a built-in optimizer's params are checked against its own model before anything is enqueued
    with pytest.raises(errors.ValidationError) as info:
        oclient.optimize("qa", labelled(6), session="s6", params={"max_bootstrapped_demos": "many"})
    assert info.value.errors[0]["field"] == "params.max_bootstrapped_demos"
    with pytest.raises(errors.ValidationError) as info:
        oclient.optimize("qa", labelled(6), session="s6", optimizer="miprov2", params={"num_trails": 3})
    assert "did you mean 'num_trials'?" in info.value.errors[0]["message"]
    assert oclient.runs.ids() == []

    # And a user's optimizer's, which only workers know, are refused by the worker, naming the field
    try:
        run = oclient.optimize("qa", labelled(6), session="s6", optimizer="custom_unpublished",
                               params={"rounds": 0})
        with pytest.raises(errors.ValidationError) as info:
            run.get(timeout=30)
        assert info.value.errors[0]["field"] == "params.rounds"
    finally:
        del optimizers._REGISTRY["custom_unpublished"]
    assert oclient.programs.history("s6", "qa") == []


def test_sessionless_run_is_a_dry_run_returning_its_candidate(oclient: Any, opt_app: Any) -> None:
    from dspex_tasks.programs.state import load_program

    # Given a run without a session
    run = oclient.optimize("qa", labelled(16), params={"eval_chunk_size": 4})
    # When it finishes
    summary = run.get(timeout=60)
    # Then it ran and evaluated the candidate, promoted nothing, and says so plainly
    assert summary["dry_run"] is True and summary["promoted"] is False
    assert summary["score"] > summary["baseline_score"] and summary["program_version"] == 0
    assert summary["reason"].startswith("dry run (no session)") and "run.candidate()" in summary["reason"]
    # And its candidate is a program state a worker loads, and one a session can be given
    state = run.candidate()
    assert load_program(opt_app.dspex_signatures.get("qa"), state) is not None
    assert oclient.run(run.id).candidate() == state
    assert oclient.programs.put("s10", "qa", state, signature="qa") == 1
    res = oclient.submit("qa", {"question": "abc"}, session="s10").get(timeout=20)
    assert res.program_version == 1 and res.outputs["answer"] == rule_answer({"question": "abc"})
    # kept as long as the run's record
    ns, store = oclient.settings.namespace, oclient.runs
    from dspex_tasks import keys

    assert oclient.redis.ttl(keys.run_checkpoint(ns, run.id, "candidate")) >= oclient.redis.ttl(keys.run(ns, run.id))
    assert store.get(run.id).summary == summary
    # A run not compiled yet has no candidate; an unknown run is not found
    queued = store.create({"signature": "qa", "program": "qa", "optimizer": "bootstrap_few_shot",
                           "metric": "exact_match"})
    with pytest.raises(errors.NotFound, match="no candidate"):
        store.candidate(queued)
    with pytest.raises(errors.RunNotFound):
        oclient.runs.candidate("0" * 32)  # well-formed, unknown


def test_named_dataset_and_random_search(oclient: Any) -> None:
    assert oclient.datasets.put("qa-train", labelled(16)) == 16
    assert "qa-train" in oclient.datasets.list()
    run = oclient.optimize("qa", dataset="qa-train", optimizer="bootstrap_few_shot_with_random_search",
                           session="s7", params={"num_candidate_programs": 2, "eval_chunk_size": 4})
    summary = run.get(timeout=90)
    assert summary["promoted"] is True and summary["trials"] and all(0 <= t <= 1 for t in summary["trials"])


def test_duplicate_stage_delivery_changes_nothing(oclient: Any, opt_app: Any) -> None:
    # Given a finished run, when its decide stage is delivered again (a redelivery after a crash)
    run = oclient.optimize("qa", labelled(12), session="s8", params={"eval_chunk_size": 4})
    summary = run.get(timeout=60)
    r = opt_app.send_task("dspex.optimize.stage", kwargs={"run_id": run.id, "stage": "decide"},
                          queue=opt_app.dspex_settings.optimize_queue)
    r.get(timeout=20)
    # Then no second program version is written and the summary stands
    assert oclient.programs.history("s8", "qa") == [summary["program_version"]]
    assert run.status()["summary"] == summary


def test_lease_blocks_a_second_runner(oclient: Any, opt_app: Any) -> None:
    store = RunStore(redis=oclient.redis, namespace=oclient.settings.namespace)
    assert store.acquire_lease(RUN_ID, "a", 5) is True
    assert store.acquire_lease(RUN_ID, "b", 5) is False
    assert store.renew_lease(RUN_ID, "b", 5) is False and store.renew_lease(RUN_ID, "a", 5) is True
    store.release_lease(RUN_ID, "b")
    assert store.acquire_lease(RUN_ID, "b", 5) is False
    store.release_lease(RUN_ID, "a")
    assert store.acquire_lease(RUN_ID, "b", 5) is True


def test_many_followers_see_the_same_stream(oclient: Any) -> None:
    run = oclient.optimize("qa", labelled(12), session="s9", params={"eval_chunk_size": 4})
    seen: list[list[dict[str, Any]]] = [[], [], []]
    threads = [threading.Thread(target=lambda i=i: seen[i].extend(run.events(timeout=60))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(70)
    assert seen[0] and seen[0] == seen[1] == seen[2]
