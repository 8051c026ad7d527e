"""The reference signatures in ``signatures/``: importable, registered, with the documented fields."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import signatures
from dspex_tasks import Signature, registry, signature

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

EXPECTED: dict[str, dict[str, Any]] = {
    "qa": {
        "inputs": {"question": "str"},
        "outputs": {"answer": "str", "confidence": "confidence_score"},
    },
    "complex_analysis": {
        "inputs": {"text": "str", "context": "list[str]"},
        "outputs": {"analysis": "reasoning_chain", "confidence": "confidence_score", "entities": "list[entity]"},
    },
    "classify": {
        "inputs": {"text": "str"},
        "outputs": {"label": 'literal["positive", "negative", "neutral"]', "confidence": "confidence_score"},
    },
    "summarize": {
        "inputs": {"text": "str", "max_words": "int"},
        "outputs": {"summary": "str", "key_points": "list[str]"},
    },
}
GOOD_OUTPUTS: dict[str, dict[str, Any]] = {
    "qa": {"answer": "Paris", "confidence": 0.9},
    "complex_analysis": {"analysis": ["a", "b"], "confidence": 0.5, "entities": [{"text": "Paris", "type": "LOC"}]},
    "classify": {"label": "neutral", "confidence": 0.4},
    "summarize": {"summary": "Short.", "key_points": ["one", "two"]},
}


def test_all_lists_each_reference_signature_once() -> None:
    assert isinstance(signatures.ALL, tuple)
    assert all(isinstance(s, Signature) for s in signatures.ALL)
    assert sorted(s.name for s in signatures.ALL) == sorted(EXPECTED)
    assert signatures.by_name() == {s.name: s for s in signatures.ALL}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exposed_by_name_with_the_documented_fields(name: str) -> None:
    s = getattr(signatures, name)
    assert isinstance(s, Signature)
    assert s.name == name
    assert s.input_fields == EXPECTED[name]["inputs"]
    assert s.output_fields == EXPECTED[name]["outputs"]
    assert s.instructions, "reference signatures carry instructions"
    assert s.module in ("predict", "chain_of_thought")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_registered_under_their_name(name: str) -> None:
    assert name in registry
    assert registry.get(name) == getattr(signatures, name)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_normalized_spec_redefines_the_same_signature(name: str) -> None:
    s = getattr(signatures, name)
    again = signature(s.spec, name=s.name, instructions=s.instructions, module=s.module, register=False)
    assert again == s


def test_complex_analysis_matches_the_dspex_seed_spelling() -> None:
    dspex = signature(
        "text: :string, context: {:list, :string} -> analysis: :reasoning_chain, confidence: :confidence_score, "
        "entities: {:list, :entity}",
        name="complex_analysis",
        instructions=signatures.complex_analysis.instructions,
        module=signatures.complex_analysis.module,
        register=False,
    )
    assert dspex == signatures.complex_analysis


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_schemas_and_validation_work(name: str) -> None:
    s = getattr(signatures, name)
    jsonschema.Draft202012Validator.check_schema(s.input_schema())
    openai = s.json_schema("openai")["json_schema"]["schema"]
    jsonschema.Draft202012Validator.check_schema(openai)
    outputs = s.validate_outputs(GOOD_OUTPUTS[name])
    jsonschema.validate(outputs, s.output_schema(), cls=jsonschema.Draft202012Validator)
    jsonschema.validate(outputs, openai, cls=jsonschema.Draft202012Validator)


def test_classify_rejects_labels_outside_the_enum() -> None:
    from dspex_tasks import errors

    with pytest.raises(errors.ValidationError) as info:
        signatures.classify.validate_outputs({"label": "mixed", "confidence": 0.5})
    assert [e["field"] for e in info.value.errors] == ["label"]


def test_a_fresh_import_registers_all_four() -> None:
    code = "import signatures\nfrom dspex_tasks import registry\nprint(','.join(registry.names()))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.strip().split(",")) >= set(EXPECTED)
