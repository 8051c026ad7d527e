"""Layer 3: programs (dspy.Modules registered with ``program()``) optimized on a real worker process,
through dspy -> LiteLLM -> the HTTP mock LM, promoted with every predictor's state and served."""

from __future__ import annotations

import os
import py_compile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dspex_tasks.client import Client
from dspex_tasks.testing import mockgen
from dspex_tasks.testing.mock_server import MockLMServer
from tests._procs import ROOT, WorkerProcess, wait_for

pytestmark = pytest.mark.system

NS = "optprog"
#: A line of tests/system/_programs.py:DraftThenAnswer, which the worker imports by module name.
SOURCE_LINE = 'self.answer = dspy.ChainOfThought("question, draft -> answer")  # the optimizer\'s proposer reads'
#: Words of DSPy's DescribeProgram / DescribeModule prompts (the program-aware proposer's).
DESCRIBE = "Pseudocode for a language model program"
MIPRO = {"eval_chunk_size": 4, "num_trials": 2, "max_bootstrapped_demos": 1, "max_labeled_demos": 1}
# A program module deployed without its source (bytecode only, as some images ship): the worker imports it
# by name, and inspect cannot read its class.
SHIPPED = """
import dspy
from dspex_tasks import program


@program("sys_shipped", interface="question -> answer")
class Shipped(dspy.Module):
    def __init__(self):
        super().__init__()
        self.draft = dspy.Predict("question -> draft")
        self.answer = dspy.Predict("question, draft -> answer")

    def forward(self, question):
        return self.answer(question=question, draft=self.draft(question=question).draft)
"""


def sourceless_module(where: Path) -> Path:
    """``sys_shipped.pyc`` alone in ``where`` (importable as ``sys_shipped``); returns ``where``."""
    src = where / "sys_shipped.py"
    src.write_text(SHIPPED)
    py_compile.compile(str(src), cfile=str(where / "sys_shipped.pyc"), doraise=True)
    src.unlink()
    return where


class Prompts:
    """Every prompt the mock server answers (its request log keeps settings, not messages)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._answer = mockgen.answer

    def answer(self, messages: Any, **kwargs: Any) -> str:
        self.seen.append("\n".join(mockgen.message_text(m) for m in messages))
        return self._answer(messages, **kwargs)

    def containing(self, text: str) -> list[str]:
        return [p for p in list(self.seen) if text in p]


@pytest.fixture(scope="module")
def prompts() -> Iterator[Prompts]:
    recorder = Prompts()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mockgen, "answer", recorder.answer)  # the server thread answers through mockgen.answer
        yield recorder


@pytest.fixture(scope="module")
def mock_lm(prompts: Prompts) -> Iterator[MockLMServer]:
    server = MockLMServer(port=0, latency_ms=5).start()
    server.control(scenario="learns_from_demos")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def optimizing(redis_base_url: str, mock_lm: MockLMServer, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[Client, WorkerProcess]]:
    """One worker serving the predict and optimize queues of a namespace of this module's own."""
    from dspex_tasks.settings import Settings

    queues = {"DSPEX_PREDICT_QUEUE": f"{NS}.predict", "DSPEX_OPTIMIZE_QUEUE": f"{NS}.optimize"}
    shipped = sourceless_module(tmp_path_factory.mktemp("shipped"))
    env = {"DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": mock_lm.url, "DSPEX_LM_API_KEY": "sk-test-not-real",
           "DSPEX_SIGNATURE_MODULES": "tests.system._programs,sys_shipped", "DSPEX_CACHE_VERIFY_S": "0.2",
           "DSPEX_LM_NUM_RETRIES": "0", "PYTHONPATH": os.pathsep.join([str(ROOT), str(shipped)]), **queues}
    w = WorkerProcess(redis_base_url, NS, queues=",".join(queues.values()), concurrency=16, env=env, name=NS,
                      log_dir=tmp_path_factory.mktemp(NS))
    client = Client(settings=Settings(redis_url=redis_base_url, namespace=NS, predict_queue=f"{NS}.predict",
                                      optimize_queue=f"{NS}.optimize"))
    try:
        w.wait_ready(timeout_s=60)
        wait_for(lambda: {"sys_draft", "sys_shipped"} <= set(client.signatures(refresh=True)),
                 what="programs published")
        yield client, w
    finally:
        client.close()
        w.stop()


def labelled(n: int, prefix: str) -> list[dict[str, Any]]:
    return [{"question": f"{prefix} {i}", "answer": mockgen.rule_answer({"question": f"{prefix} {i}"})}
            for i in range(n)]


def test_a_two_predictor_program_is_optimized_promoted_and_served(optimizing: tuple[Client, WorkerProcess]) -> None:
    client, _ = optimizing
    assert client.signatures()["sys_draft"]["predictors"] == ["draft", "answer.predict"]
    # Given a session serving the program as built, which answers at random
    question = {"question": "what is a fresh one"}
    assert client.submit("sys_draft", question, session="o1").get(timeout=30).program_version == 0
    # When a run whose labelled rows the answer predictor can learn from demos finishes
    run = client.optimize("sys_draft", labelled(12, "bootstrap"), session="o1", optimizer="bootstrap_few_shot",
                          params={"eval_chunk_size": 4, "max_bootstrapped_demos": 2, "max_labeled_demos": 2})
    summary = run.get(timeout=60)
    # Then it is promoted with the state of both predictors, each with its bootstrapped demos
    assert summary["promoted"] is True and summary["baseline_score"] == 0.0 and summary["score"] == 1.0, summary
    state = client.programs.get("o1", "sys_draft").state
    assert sorted(state) == ["answer.predict", "draft"] and state == run.candidate()
    assert all(d.get("augmented") and "draft" in d for d in state["draft"]["demos"]) and state["draft"]["demos"]
    assert {"question", "draft", "reasoning", "answer"} <= set(state["answer.predict"]["demos"][0])
    # And the session serves it: the learned behaviour under the new version
    res = wait_for(lambda: (r := client.submit("sys_draft", question, session="o1").get(timeout=30))
                   .program_version == summary["program_version"] == 1 and r, timeout_s=5, what="v1 served")
    assert res.outputs["answer"] == mockgen.rule_answer(question)
    assert [e["stage"] for e in run.events(timeout=5)][-1] == "done"


def test_miprov2_proposes_instructions_from_the_program_source_on_the_worker(
        optimizing: tuple[Client, WorkerProcess], prompts: Prompts) -> None:
    client, _ = optimizing
    prompts.seen.clear()
    # When MIPROv2 (few trials, program-aware proposer) optimizes the program on the worker process
    run = client.optimize("sys_draft", labelled(12, "mipro"), session="o2", optimizer="miprov2", params=MIPRO)
    summary = run.get(timeout=60)
    # Then the proposer's prompts carried the program's own source, read from the file the worker imported
    described = prompts.containing(DESCRIBE)
    assert described, "no program-aware proposer prompt reached the LM"
    assert all(SOURCE_LINE in p for p in described), described[0][:2000]
    assert all("class DraftThenAnswer(dspy.Module)" in p for p in described)
    # And the run promoted both predictors' state, which the session serves
    assert summary["promoted"] is True and summary["score"] == 1.0, summary
    state = client.programs.get("o2", "sys_draft").state
    assert sorted(state) == ["answer.predict", "draft"] and state["answer.predict"]["demos"]
    res = wait_for(lambda: (r := client.submit("sys_draft", {"question": "abc"}, session="o2").get(timeout=30))
                   .program_version == summary["program_version"] and r, timeout_s=5, what="new version served")
    assert res.outputs["answer"] == mockgen.rule_answer({"question": "abc"})


def test_miprov2_on_a_worker_without_a_programs_source_reads_its_factory_or_outline(
        optimizing: tuple[Client, WorkerProcess], prompts: Prompts) -> None:
    client, worker = optimizing
    # Given a program built by a factory returning a bare dspy.Predict (DSPy's lookup finds an empty source)
    prompts.seen.clear()
    factory = client.optimize("sys_draft_factory", labelled(12, "factory"), session="o3", optimizer="miprov2",
                              params=MIPRO).get(timeout=60)
    # Then the proposer read the factory's source and the predictor it built
    described = prompts.containing(DESCRIBE)
    assert described and factory["promoted"] is True, factory
    for text in ("def draft_factory():", '"Answer in the house style."))  # from a factory',
                 'program = dspy.Predict("question -> answer")'):
        assert all(text in p for p in described), (text, described[0][:3000])
    # Given a two-predictor program whose module was deployed as bytecode only (no source on the worker)
    prompts.seen.clear()
    run = client.optimize("sys_shipped", labelled(12, "shipped"), session="o4", optimizer="miprov2", params=MIPRO)
    summary = run.get(timeout=60)
    # Then the proposer still described it, from an outline of its predictors, and the worker said why
    described = prompts.containing(DESCRIBE)
    assert described, "the proposer ran without its program-aware step"
    for text in ("class Shipped(dspy.Module):  # outline of the built module",
                 'self.draft = dspy.Predict("question -> draft")',
                 'self.answer = dspy.Predict("question, draft -> answer")'):
        assert all(text in p for p in described), (text, described[0][:3000])
    assert "no source for the program sys_shipped.Shipped" in worker.log()
    # And both predictors' state was promoted and is served
    assert summary["promoted"] is True, summary
    state = client.programs.get("o4", "sys_shipped").state
    assert sorted(state) == ["answer", "draft"] and state["answer"]["demos"]
    res = wait_for(lambda: (r := client.submit("sys_shipped", {"question": "abc"}, session="o4").get(timeout=30))
                   .program_version == summary["program_version"] and r, timeout_s=5, what="new version served")
    assert res.outputs["answer"] == mockgen.rule_answer({"question": "abc"})
