"""The Redis program store refuses state its signature's module cannot load before it writes anything."""

from __future__ import annotations

import time
from typing import Any

import pytest

from dspex_tasks import errors, keys
from dspex_tasks.dsl.signature import SignatureRegistry, signature
from dspex_tasks.programs.store import ProgramStore

pytestmark = pytest.mark.redis

RAG_STATE = {  # DSPy's dump_state() of a program with a retriever and a ChainOfThought
    "retrieve": {"demos": [], "traces": [], "train": [], "signature": {"instructions": "r", "fields": []}, "lm": None},
    "generate_answer.predict": {"demos": [{"question": "q", "answer": "a"}], "traces": [], "train": [],
                                "signature": {"instructions": "g", "fields": []}, "lm": None},
}


def test_a_refused_put_leaves_no_version_and_publishes_nothing(redis_client: Any, namespace: str) -> None:
    reg = SignatureRegistry()
    reg.add(signature("question: str -> answer: str", name="fit_qa", module="chain_of_thought", register=False))
    store = ProgramStore(redis=redis_client, namespace=namespace, signatures=reg)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.program_events(namespace))
    time.sleep(0.05)
    with pytest.raises(errors.ValidationError) as info:
        store.put("s1", "p1", RAG_STATE, signature="fit_qa", token="t1")
    assert [e["field"] for e in info.value.errors] == ["retrieve", "generate_answer.predict"]
    assert "'predict'" in info.value.errors[0]["message"]
    assert store.history("s1", "p1") == [] and store.current_version("s1", "p1") == 0
    assert store.sessions() == [] and redis_client.keys(f"{namespace}:*") == []
    assert pubsub.get_message(timeout=0.2) is None
    # a fitting state under the same token is version 1: the refused put recorded nothing
    assert store.put("s1", "p1", {"predict": RAG_STATE["generate_answer.predict"]}, signature="fit_qa",
                     token="t1") == 1
    pubsub.close()


def test_a_client_without_the_signature_code_refuses_against_what_workers_published(redis_url: str,
                                                                                   namespace: str) -> None:
    """The client has neither dspy nor the signature: the module kind comes from the published schemas."""
    from dspex_tasks.client import Client
    from dspex_tasks.worker.runtime import publish_signatures

    sig = signature("question -> answer", name="fit_pub", module="chain_of_thought", register=False)
    with Client(redis_url=redis_url, namespace=namespace) as client:
        publish_signatures(client.redis, namespace, [sig])
        with pytest.raises(errors.ValidationError) as info:
            client.programs.put("s2", "fit_pub", RAG_STATE)
        assert [e["field"] for e in info.value.errors] == ["retrieve", "generate_answer.predict"]
        assert client.programs.history("s2", "fit_pub") == []
        assert client.programs.put("s2", "fit_pub", {"predict": RAG_STATE["generate_answer.predict"]}) == 1
