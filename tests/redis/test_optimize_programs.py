"""Optimization runs of programs (any dspy.Module registered with ``program()``) on a real Redis with an
in-process worker: every optimizer compiles every predictor, and the session serves what it promoted."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import dspy
import pytest

from dspex_tasks import program
from dspex_tasks.dsl.signature import SignatureRegistry
from dspex_tasks.testing import mockgen
from dspex_tasks.testing.mockgen import rule_answer

pytestmark = pytest.mark.redis

PASSAGES = ["Paris is the capital of France.", "Mount Fuji is in Japan.", "The Nile flows through Egypt."]


class DraftThenAnswer(dspy.Module):
    """Two predictors: a draft, then an answer that reasons over it."""

    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.Predict("question -> draft")
        self.answer = dspy.ChainOfThought("question, draft -> answer")

    def forward(self, question: str) -> Any:
        draft = self.draft(question=question).draft
        return self.answer(question=question, draft=draft)


class MultiHop(dspy.Module):
    """DSPy's multi-hop tutorial shape: a query per hop (one predictor called twice), then the answer."""

    def __init__(self, hops: int = 2) -> None:
        super().__init__()
        self.hops = hops
        self.generate_query = dspy.ChainOfThought("question, notes -> query")
        self.respond = dspy.Predict("question, notes -> answer")

    def forward(self, question: str) -> Any:
        notes: list[str] = []
        for _ in range(self.hops):
            query = self.generate_query(question=question, notes=notes).query
            notes.extend(p for p in PASSAGES if set(query.lower().split()) & set(p.lower().split()))
        return self.respond(question=question, notes=notes)


def draft_factory() -> Any:
    """A factory returning a bare predictor: DSPy's own source lookup finds nothing of the program in it."""
    return dspy.Predict(dspy.Signature("question -> answer", "Answer the question in the house style."))


# A class whose source nobody can read (generated code; on a worker, also a module shipped as .pyc only).
_GENERATED = """
class Generated(dspy.Module):
    def __init__(self):
        super().__init__()
        self.draft = dspy.Predict("question -> draft")
        self.answer = dspy.Predict("question, draft -> answer")

    def forward(self, question):
        return self.answer(question=question, draft=self.draft(question=question).draft)
"""
_scope: dict[str, Any] = {"dspy": dspy}
exec(compile(_GENERATED, "<generated>", "exec"), _scope)  # noqa: S102 - test code, a fixed string
Generated = _scope["Generated"]

PREDICTORS = {"two_step": ["draft", "answer.predict"], "hop": ["generate_query.predict", "respond"]}
#: The predictor whose demos teach the rule (the mock answers by it when its prompt holds demos).
ANSWERING = {"two_step": "answer.predict", "hop": "respond"}

OPTIMIZERS = [
    ("bootstrap_few_shot", {}),
    ("bootstrap_few_shot_with_random_search", {"num_candidate_programs": 2}),
    ("miprov2", {"num_trials": 3, "max_bootstrapped_demos": 2, "max_labeled_demos": 2}),
]


@pytest.fixture
def signatures(signatures: SignatureRegistry) -> SignatureRegistry:
    """The layer's signatures plus the programs (the worker's registry; nothing process-wide)."""
    program("two_step", interface="question -> answer", registry=signatures)(DraftThenAnswer)
    program("hop", interface="question -> answer", registry=signatures)(MultiHop)
    program("from_factory", interface="question -> answer", registry=signatures)(draft_factory)
    program("generated", interface="question -> answer", registry=signatures)(Generated)
    return signatures


@pytest.fixture
def oclient(opt_app: Any) -> Iterator[Any]:
    from dspex_tasks.client import Client

    c = Client(settings=opt_app.dspex_settings)
    yield c
    c.close()


def labelled(n: int, prefix: str = "question") -> list[dict[str, Any]]:
    return [{"question": f"{prefix} {i}", "answer": rule_answer({"question": f"{prefix} {i}"})} for i in range(n)]


def served_version(oclient: Any, name: str, session: str, version: int, question: str) -> Any:
    """The result of a submit once the session's worker serves ``version`` (its cache re-checks within ~1 s)."""
    deadline = time.time() + 5
    while (res := oclient.submit(name, {"question": question}, session=session).get(timeout=20)).program_version \
            != version:
        assert time.time() < deadline, f"still serving v{res.program_version}, not v{version}"
        time.sleep(0.1)
    return res


@pytest.mark.parametrize(("optimizer", "params"), OPTIMIZERS, ids=[o for o, _ in OPTIMIZERS])
def test_each_optimizer_compiles_every_predictor_of_a_program(oclient: Any, optimizer: str,
                                                              params: dict[str, Any]) -> None:
    name, session = "two_step", f"p-{optimizer}"
    # Given a two-predictor program the session serves as built (no demos: the mock answers at random)
    base = oclient.submit(name, {"question": "abc"}, session=session).get(timeout=20)
    assert base.program_version == 0 and base.outputs["answer"] != rule_answer({"question": "abc"})
    # When it is optimized on a dozen labelled rows
    run = oclient.optimize(name, labelled(12), metric="exact_match", optimizer=optimizer, session=session,
                           params={"eval_chunk_size": 4, **params})
    summary = run.get(timeout=120)
    # Then the candidate holds the state of every predictor, the one that answers with demos
    candidate = run.candidate()
    assert sorted(k for k in candidate if k != "metadata") == sorted(PREDICTORS[name])
    assert all(isinstance(candidate[p]["demos"], list) for p in PREDICTORS[name])
    assert candidate[ANSWERING[name]]["demos"], candidate
    # and it beat the baseline, so it is promoted: the stored version is the candidate, every predictor in it
    assert summary["promoted"] is True, summary
    assert summary["baseline_score"] == 0.0 and summary["score"] == 1.0
    assert summary["program_version"] == 1 == oclient.programs.current_version(session, name)
    assert oclient.programs.get(session, name).state == candidate
    # And the session serves it: the learned behaviour, under the new version
    res = served_version(oclient, name, session, 1, "abc")
    assert res.outputs["answer"] == rule_answer({"question": "abc"})
    if optimizer == "miprov2":
        assert summary["trials"] and all(0.0 <= t <= 1.0 for t in summary["trials"])


def test_a_multi_hop_program_is_optimized_with_bootstrapped_demos_for_both_predictors(oclient: Any) -> None:
    # Given DSPy's multi-hop shape: one predictor called once per hop, another that answers
    run = oclient.optimize("hop", labelled(12), optimizer="bootstrap_few_shot", session="hop1",
                           params={"eval_chunk_size": 4, "max_labeled_demos": 2, "max_bootstrapped_demos": 2})
    summary = run.get(timeout=120)
    # Then each predictor has the demos bootstrapped from the traces the metric accepted: the query
    # predictor's carry its reasoning and notes, the answering one's the notes the hops gathered
    state = oclient.programs.get("hop1", "hop").state
    assert summary["promoted"] is True and summary["score"] == 1.0, summary
    queries, answers = state["generate_query.predict"]["demos"], state["respond"]["demos"]
    assert len(queries) == len(answers) == 2, state
    assert all(d.get("augmented") and {"reasoning", "notes", "query"} <= set(d) for d in queries)
    assert all(d.get("augmented") and {"notes", "answer"} <= set(d) for d in answers)
    res = served_version(oclient, "hop", "hop1", summary["program_version"], "where is the Nile")
    assert res.outputs["answer"] == rule_answer({"question": "where is the Nile"})


def test_a_program_run_is_gated_and_a_second_run_does_not_promote(oclient: Any) -> None:
    # Given a promoted program
    first = oclient.optimize("two_step", labelled(12), session="g1", params={"eval_chunk_size": 4}).get(timeout=90)
    assert first["promoted"] is True
    # When it already does its best, a second run evaluates its stored state as the baseline and keeps it
    again = oclient.optimize("two_step", labelled(12, "other"), session="g1",
                             params={"eval_chunk_size": 4}).get(timeout=90)
    assert again["baseline_score"] == 1.0 and again["promoted"] is False and "min_gain" in again["reason"]
    assert oclient.programs.history("g1", "two_step") == [1]


MIPRO = {"eval_chunk_size": 4, "num_trials": 2, "max_bootstrapped_demos": 1, "max_labeled_demos": 1}
#: Words of DSPy's DescribeProgram / DescribeModule prompts (the program-aware proposer's)
DESCRIBE = "Pseudocode for a language model program"


@pytest.fixture
def prompts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every prompt the in-process mock LM answers, as text."""
    seen: list[str] = []
    answer = mockgen.answer

    def recording(messages: Any, **kwargs: Any) -> str:
        seen.append("\n".join(mockgen.message_text(m) for m in messages))
        return answer(messages, **kwargs)

    monkeypatch.setattr(mockgen, "answer", recording)
    return seen


def test_miprov2_proposer_reads_the_program_class_source(oclient: Any, prompts: list[str]) -> None:
    summary = oclient.optimize("two_step", labelled(12), optimizer="miprov2", params=MIPRO).get(timeout=90)
    described = [p for p in prompts if DESCRIBE in p]
    assert described and summary["score"] == 1.0
    assert all('self.answer = dspy.ChainOfThought("question, draft -> answer")' in p for p in described)


def test_miprov2_proposer_reads_a_factory_source_where_dspy_finds_none(oclient: Any, prompts: list[str]) -> None:
    from dspy.propose.utils import get_dspy_source_code

    # Given a factory returning a bare dspy.Predict, of which DSPy's source lookup finds nothing
    assert get_dspy_source_code(draft_factory()).strip() == ""
    # When MIPROv2 optimizes it
    run = oclient.optimize("from_factory", labelled(12), session="f1", optimizer="miprov2", params=MIPRO)
    summary = run.get(timeout=90)
    # Then its proposer read the factory's source and the predictor's signature and instructions
    described = [p for p in prompts if DESCRIBE in p]
    assert described and summary["promoted"] is True, summary
    for text in ('def draft_factory() -> Any:', 'return dspy.Predict(dspy.Signature("question -> answer", ',
                 'program = dspy.Predict("question -> answer")', "# instructions: Answer the question in the house"):
        assert all(text in p for p in described), (text, described[0])


def test_miprov2_proposer_reads_an_outline_of_a_class_without_source(oclient: Any, prompts: list[str],
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    import inspect

    # Given a two-predictor class whose source cannot be read (DSPy would drop its program-aware step)
    with pytest.raises(OSError):
        inspect.getsource(Generated)
    # When MIPROv2 optimizes it
    run = oclient.optimize("generated", labelled(12), session="f2", optimizer="miprov2", params=MIPRO)
    summary = run.get(timeout=90)
    # Then the proposer still described the program, from an outline of the predictors the module holds
    described = [p for p in prompts if DESCRIBE in p]
    assert described, "the proposer ran without its program-aware step"
    outline = ['class Generated(dspy.Module):  # outline of the built module: its source is not available',
               'self.draft = dspy.Predict("question -> draft")', 'self.answer = dspy.Predict("question, draft -> answer")']
    assert all(line in p for p in described for line in outline), described[0]
    # and the worker said why; the promoted state covers both predictors
    assert any("no source for the program" in r.getMessage() and "Generated" in r.getMessage() for r in caplog.records)
    assert summary["promoted"] is True, summary
    state = oclient.programs.get("f2", "generated").state
    assert sorted(state) == ["answer", "draft"] and state["answer"]["demos"]


def test_a_program_run_streams_its_stages_and_a_cancel_leaves_the_program(oclient: Any) -> None:
    # Given a session holding a state of both predictors
    state = {"draft": {"demos": []}, "answer.predict": {"demos": []}}
    assert oclient.programs.put("c1", "two_step", state) == 1
    # When a run's events are followed to the end, they go through every stage in order
    run = oclient.optimize("two_step", labelled(12), session="c2", params={"eval_chunk_size": 4})
    stages = [e["stage"] for e in run.events(timeout=60)]
    assert list(dict.fromkeys(stages)) == ["queued", "load", "baseline", "compile", "candidate", "done"]
    # And a run cancelled before its stages ran stops at a boundary, the stored program untouched
    cancelled = oclient.optimize("two_step", labelled(40), session="c1", params={"eval_chunk_size": 2})
    cancelled.cancel()
    assert list(cancelled.events(timeout=60))[-1]["stage"] == "cancelled"
    assert cancelled.status()["status"] == "cancelled"
    assert oclient.programs.history("c1", "two_step") == [1] and oclient.programs.get("c1", "two_step").state == state


def test_miprov2_with_few_trials_runs_on_a_signature_with_a_small_valset(oclient: Any, prompts: list[str]) -> None:
    # Given 12 rows (4 for validation, under DSPy's minibatch of 35, which it refuses to shrink)
    run = oclient.optimize("qa", labelled(12), session="m1", optimizer="miprov2", params=MIPRO)
    # Then the run completes (no "Minibatch size cannot exceed the size of the valset") and promotes
    summary = run.get(timeout=90)
    assert summary["promoted"] is True and summary["score"] == 1.0 and summary["trials"], summary
    # and the proposer read the signature's module in outline (DSPy's lookup gives a bare Predict nothing)
    described = [p for p in prompts if DESCRIBE in p]
    assert described and all('program = dspy.Predict("question -> answer, confidence")' in p for p in described)
    assert all("# instructions: Answer the question." in p for p in described)
