"""Layer 3: programs (any dspy.Module) on real worker processes, through dspy -> LiteLLM -> the HTTP mock LM."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dspex_tasks import errors
from dspex_tasks.client import Client
from dspex_tasks.testing.mock_server import MockLMServer
from tests._procs import WorkerProcess, wait_for

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def mock_lm() -> Iterator[MockLMServer]:
    server = MockLMServer(port=0).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def served(redis_base_url: str, mock_lm: MockLMServer, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Client, WorkerProcess]]:
    ns = "progsys"
    env = {"DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": mock_lm.url, "DSPEX_LM_API_KEY": "sk-test-not-real",
           "DSPEX_SIGNATURE_MODULES": "tests.system._programs", "DSPEX_PREDICT_QUEUE": f"{ns}.predict",
           "DSPEX_CACHE_VERIFY_S": "0.2"}
    w = WorkerProcess(redis_base_url, ns, queues=f"{ns}.predict", concurrency=8, env=env, name="progsys",
                      log_dir=tmp_path_factory.mktemp("progsys"))
    from dspex_tasks.settings import Settings

    client = Client(settings=Settings(redis_url=redis_base_url, namespace=ns, predict_queue=f"{ns}.predict"))
    try:
        w.wait_ready(timeout_s=60)
        wait_for(lambda: "sys_people" in client.signatures(refresh=True), what="programs published")
        yield client, w
    finally:
        client.close()
        w.stop()


def test_programs_are_published_with_kind_predictors_and_typed_schemas(served: tuple[Client, WorkerProcess]) -> None:
    client, _ = served
    sigs = client.signatures(refresh=True)
    assert sigs["sys_hop"]["kind"] == "program" and sigs["sys_hop"]["predictors"] == [
        "generate_query.predict", "answer"]
    assert sigs["sys_rag"]["predictors"] == ["respond.predict"]
    assert sigs["sys_people"]["output_schema"]["$defs"]["Person"]["properties"]["role"]["enum"] == [
        "author", "editor"]
    with pytest.raises(errors.ValidationError, match="claim"):
        client.submit("sys_hop", {"question": "not the interface"})  # validated before enqueue, without dspy


def test_each_program_serves_typed_outputs(served: tuple[Client, WorkerProcess], mock_lm: MockLMServer) -> None:
    client, _ = served
    rag = client.submit("sys_rag", {"question": "Where is the Eiffel Tower?"}).get(timeout=60)
    assert isinstance(rag.outputs["response"], str) and rag.lm == "openai/mock"
    people = client.submit("sys_people", {"text": "Ann wrote it and Bob edited it."}).get(timeout=60)
    assert people.outputs["people"] and all(p["role"] in ("author", "editor") for p in people.outputs["people"])
    before = mock_lm.stats()["requests"]
    hop = client.submit("sys_hop", {"claim": "Mount Fuji is in Japan."}).get(timeout=60)
    assert isinstance(hop.outputs["verdict"], bool)
    # a multi-hop job makes all its LM calls (two queries, one answer) in one task, and each is counted
    assert hop.usage["lm_calls"] == 3 == mock_lm.stats()["requests"] - before


def test_a_stored_state_changes_the_prompts_and_a_mismatched_one_is_refused(
        served: tuple[Client, WorkerProcess]) -> None:
    client, _ = served
    claim = {"claim": "The Nile flows through Egypt."}
    plain = client.submit("sys_hop", claim, session="p1").get(timeout=60)
    assert plain.program_version == 0
    long_demo = {"claim": "c", "notes": [], "reasoning": "r", "query": "nile " * 200}
    state = {"generate_query.predict": {"demos": [long_demo]}, "answer": {"demos": []}}
    for bad, field in (({**state, "retrieve": {"demos": []}}, "retrieve"),
                       ({"generate_query.predict": {"demos": [long_demo]}}, "answer"),
                       ({**state, "answer": {"demos": "notalist"}}, "answer.demos")):
        with pytest.raises(errors.ValidationError) as info:
            client.programs.put("p2", "sys_hop", bad)
        assert field in [e["field"] for e in info.value.errors]
    assert client.programs.history("p2", "sys_hop") == []  # nothing written
    assert client.programs.put("p2", "sys_hop", state) == 1
    stored = client.submit("sys_hop", claim, session="p2").get(timeout=60)
    assert stored.program_version == 1
    assert stored.usage["prompt_tokens"] > plain.usage["prompt_tokens"] + 300  # the demo is in both query prompts


def test_the_gateway_serves_a_program_with_typed_routes(served: tuple[Client, WorkerProcess]) -> None:
    from fastapi.testclient import TestClient

    from dspex_tasks.gateway import create_gateway

    client, _ = served
    settings = client.settings.model_copy(update={"gateway_auth": False})
    with TestClient(create_gateway(settings, client=client), client=("127.0.0.1", 50000)) as http:
        doc = http.get("/openapi.json").json()
        assert "/v1/signatures/sys_people:run" in doc["paths"]
        outputs = doc["components"]["schemas"]["sys_people.outputs"]
        person = outputs["properties"]["people"]["items"]["$ref"]  # the model's $defs became components
        assert person.startswith("#/components/schemas/") and person.split("/")[-1] in doc["components"]["schemas"]
        r = http.post("/v1/signatures/sys_people:run", json={"inputs": {"text": "Ann wrote it."}})
        assert r.status_code == 200, r.text
        assert all(p["role"] in ("author", "editor") for p in r.json()["result"]["outputs"]["people"])
        bad = http.post("/v1/signatures/sys_hop:run", json={"inputs": {"question": "wrong"}})
        assert bad.status_code == 422 and "claim" in bad.text


def test_a_file_saved_by_dspy_is_stored_with_the_cli(served: tuple[Client, WorkerProcess], tmp_path: Path) -> None:
    import subprocess
    import sys

    import dspy

    from tests._procs import ROOT, worker_env
    from tests.system._programs import Hop

    client, _ = served
    module = Hop()
    module.answer.demos = [dspy.Example(claim="c", notes=["n"], verdict=True)]
    module.save(str(tmp_path / "hop.json"))  # DSPy's own file: every predictor, and its metadata
    env = worker_env(client.settings.redis_url, client.settings.namespace)
    cli = [sys.executable, "-m", "dspex_tasks", "programs", "put", "p3", "sys_hop"]
    proc = subprocess.run([*cli, str(tmp_path / "hop.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "v1" in proc.stdout and "1 demos" in proc.stdout
    assert client.submit("sys_hop", {"claim": "x"}, session="p3").get(timeout=60).program_version == 1
    (tmp_path / "rag.json").write_text('{"retrieve": {"demos": []}, "respond.predict": {"demos": []}}')
    refused = subprocess.run([*cli, str(tmp_path / "rag.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=60, check=False)
    assert refused.returncode == 2 and "retrieve" in refused.stderr, refused.stderr
    assert client.programs.history("p3", "sys_hop") == [1]


REFERENCE_INPUTS = {
    "rag": {"question": "What is the capital of the Veshan Isles?"},
    "multihop": {"claim": "The volcano on the largest Veshan island erupted before Port Ellery was founded."},
    "agent": {"question": "How many years passed between the founding of Port Ellery and 2024?"},
    "best_answer": {"question": "Which island is known for sheep farming?"},
    "extract": {"text": "In 1821 the harbour master Ida Brenn founded Port Ellery with the trader Olav Sund."},
}


@pytest.fixture(scope="module")
def reference(redis_base_url: str, mock_lm: MockLMServer, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Client]:
    """A worker started with the default modules: the reference signatures and programs."""
    from dspex_tasks.settings import Settings

    ns = "refprog"
    env = {"DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": mock_lm.url, "DSPEX_LM_API_KEY": "sk-test-not-real",
           "DSPEX_PREDICT_QUEUE": f"{ns}.predict"}
    w = WorkerProcess(redis_base_url, ns, queues=f"{ns}.predict", concurrency=8, env=env, name="refprog",
                      log_dir=tmp_path_factory.mktemp("refprog"))
    client = Client(settings=Settings(redis_url=redis_base_url, namespace=ns, predict_queue=f"{ns}.predict"))
    try:
        w.wait_ready(timeout_s=60)
        wait_for(lambda: set(REFERENCE_INPUTS) <= set(client.signatures(refresh=True)), what="programs published")
        yield client
    finally:
        client.close()
        w.stop()


@pytest.mark.parametrize("name", sorted(REFERENCE_INPUTS))
def test_each_reference_program_serves_typed_outputs(reference: Client, name: str) -> None:
    from jsonschema import Draft202012Validator

    published = reference.signatures()[name]
    assert published["kind"] == "program" and published["predictors"]
    res = reference.submit(name, REFERENCE_INPUTS[name], trace=True).get(timeout=90)
    assert not list(Draft202012Validator(published["output_schema"]).iter_errors(res.outputs)), res.outputs
    assert res.usage["lm_calls"] >= 1 and res.lm == "openai/mock"
    # every predictor call, named as named_predictors() names it (Refine's own feedback step is not one of them)
    assert res.trace and {t["predictor"] for t in res.trace} & set(published["predictors"])
    if name == "agent":  # the trajectory shows a real tool call and its observation
        react = [t for t in res.trace if "trajectory" in t["inputs"]]
        assert any("observation_0" in str(t["inputs"]["trajectory"]) for t in react[1:]), res.trace
    if name == "multihop":
        assert res.usage["lm_calls"] > 2  # the loop ran in the one task
