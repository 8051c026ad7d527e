"""The OpenAPI document's shapes for client generators: closed enums that list every state, conditions nested
rather than in an ``allOf``, and request bodies whose defaults leave their properties optional."""

from __future__ import annotations

import itertools
from typing import Any

import jsonschema
import pytest

from dspex_tasks.dsl.signature import signature
from dspex_tasks.gateway.models import JOB_STATES, RESPONSE_SCHEMAS
from dspex_tasks.gateway.openapi import _nest_conditions, build_document
from dspex_tasks.optimize.optimizers import params_schemas
from dspex_tasks.optimize.runs import RunStatus, Stage

pytestmark = pytest.mark.unit


def test_the_state_enums_list_every_state() -> None:
    from celery import states

    # a generated client refuses a state its enum does not list
    assert set(states.ALL_STATES) | {"PROGRESS", states.REJECTED} <= set(JOB_STATES)
    assert RESPONSE_SCHEMAS["RunStatus"]["enum"] == [s.value for s in RunStatus]
    assert RESPONSE_SCHEMAS["RunStage"]["enum"] == [s.value for s in Stage]


def test_nested_conditions_accept_exactly_what_the_allof_accepted() -> None:
    published = params_schemas()["gepa"]
    assert all(set(c) <= {"if", "then", "else"} for c in published["allOf"])  # what this test is about
    nested = _nest_conditions(published)
    assert "allOf" not in nested and "if" in nested
    before, after = jsonschema.Draft202012Validator(published), jsonschema.Draft202012Validator(nested)
    values: dict[str, list[Any]] = {"auto": [None, "light"], "max_full_evals": [None, 3],
                                    "max_metric_calls": [None, 100]}
    for combo in itertools.product(*values.values()):
        params = {k: v for k, v in zip(values, combo, strict=True) if v is not None}
        assert before.is_valid(params) == after.is_valid(params), params
    # a condition's branch sharing a keyword with a later one stays an allOf
    clash = {"allOf": [{"if": {"required": ["a"]}, "then": {"if": {"required": ["b"]}}},
                       {"if": {"required": ["c"]}}]}
    assert _nest_conditions(clash) == clash


def _document() -> dict[str, Any]:
    qa = signature("question: str -> answer: str, confidence: confidence_score", name="qa", register=False)
    base = {"openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "paths": {"/v1/optimizations": {"post": {
        "operationId": "start_optimization", "requestBody": {"content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/OptimizationRequest"}}}}, "responses": {}}}},
        "components": {"schemas": {"OptimizationRequest": {"type": "object"}}}}
    caps = {"optimizers": ["bootstrap_few_shot", "gepa"], "metrics": ["exact_match"],
            "optimizer_params": {k: v for k, v in params_schemas().items() if k in ("bootstrap_few_shot", "gepa")}}
    return build_document(base, {"qa": qa.describe()}, caps)


def test_a_run_request_is_one_object_whose_either_or_rule_only_validators_see() -> None:
    doc = _document()
    request = doc["components"]["schemas"]["qa.optimization_request"]
    assert not {"oneOf", "anyOf", "allOf"} & request.keys() and request["required"] == ["signature"]
    assert "OptimizationRequest" not in doc["components"]["schemas"]  # FastAPI's untyped model, replaced
    validator = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/qa.optimization_request",
                                                 "components": doc["components"]})
    rows = [{"question": "q", "answer": "a", "source": 1}]
    assert validator.is_valid({"signature": "qa", "trainset": rows})
    assert validator.is_valid({"signature": "qa", "dataset": "gold", "trainset": None})
    assert not validator.is_valid({"signature": "qa"})
    assert not validator.is_valid({"signature": "qa", "trainset": rows, "dataset": "gold"})
    assert not validator.is_valid({"signature": "qa", "trainset": [{"question": 3}]})
    # params typed by the chosen optimizer (bootstrap_few_shot when none is named)
    assert validator.is_valid({"signature": "qa", "dataset": "d", "optimizer": "gepa", "params": {"auto": "light"}})
    assert not validator.is_valid({"signature": "qa", "dataset": "d", "params": {"auto": "light"}})


def test_request_bodies_state_their_defaults_in_words() -> None:
    schemas = _document()["components"]["schemas"]

    def defaults(node: Any) -> list[Any]:
        if isinstance(node, dict):
            own = [node["default"]] if "default" in node and not isinstance(node["default"], dict) else []
            return own + [d for v in node.values() for d in defaults(v)]
        return [d for v in node for d in defaults(v)] if isinstance(node, list) else []

    for name in ("qa.optimization_request", "optimizers.gepa.params", "optimizers.bootstrap_few_shot.params"):
        assert defaults(schemas[name]) == [], name
    assert schemas["qa.optimization_request"]["properties"]["metric"]["description"] == 'Default: "exact_match".'
    assert "Default: 4." in schemas["optimizers.bootstrap_few_shot.params"]["properties"]["max_bootstrapped_demos"][
        "description"]
