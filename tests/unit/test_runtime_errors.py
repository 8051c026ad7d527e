"""Malformed LM output becomes a typed parse error naming the signature, and nothing is written."""

from __future__ import annotations

from typing import Any

import pytest

from dspex_tasks import errors
from dspex_tasks.dsl.signature import SignatureRegistry, signature
from dspex_tasks.programs.store import MemoryProgramStore
from dspex_tasks.settings import Settings
from dspex_tasks.testing.mock_lm import MockLM
from dspex_tasks.worker.runtime import Runtime

pytestmark = pytest.mark.unit


def runtime_with(lm: Any) -> tuple[Runtime, Any, MemoryProgramStore]:
    reg = SignatureRegistry()
    sig = signature("question: str -> answer: str, confidence: confidence_score", name="qa_err", register=False)
    reg.add(sig)
    store = MemoryProgramStore()
    rt = Runtime(Settings(), store=store, signatures=reg)
    rt._lms["mock"] = [lm]
    return rt, sig, store


def test_out_of_range_output_is_a_parse_error_naming_the_signature() -> None:
    rt, sig, store = runtime_with(MockLM(scripted={"*": {"confidence": 7.5}}))
    with pytest.raises(errors.LMParseError, match="qa_err") as info:
        rt.predict(sig, {"question": "q"}, session="s1")
    assert info.value.errors[0]["field"] == "confidence"
    assert store.sessions() == []


def test_missing_output_field_is_a_parse_error() -> None:
    from dspy.utils import DummyLM

    rt, sig, store = runtime_with(DummyLM([{"answer": "only half"}] * 5))
    with pytest.raises(errors.LMParseError, match="qa_err"):
        rt.predict(sig, {"question": "q"})
    assert store.sessions() == []
