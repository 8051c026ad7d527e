"""Optimizer params: the schemas workers publish, the client's check against them, the worker's own check."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pydantic
import pytest

from dspex_tasks import errors
from dspex_tasks.optimize.optimizers import CommonParams, Optimizer, get_optimizer, params_schemas
from dspex_tasks.optimize.params import check_params

pytestmark = pytest.mark.unit

BUILTIN = ("bootstrap_few_shot", "bootstrap_few_shot_with_random_search", "miprov2")


def refused(params: dict[str, Any], optimizer: str = "miprov2") -> errors.ValidationError:
    schema = json.loads(json.dumps(params_schemas()))[optimizer]  # as published: through JSON
    with pytest.raises(errors.ValidationError) as info:
        check_params(params, optimizer, schema)
    return info.value


def test_published_schemas_hold_own_and_common_params_and_refuse_others() -> None:
    schemas = params_schemas()
    assert set(BUILTIN) <= set(schemas)
    for name in BUILTIN:
        props = set(schemas[name]["properties"])
        assert set(CommonParams.model_fields) <= props
        assert set(get_optimizer(name).params.model_fields) <= props
        assert schemas[name]["additionalProperties"] is False
    assert "auto" in schemas["miprov2"]["properties"] and "auto" not in schemas["bootstrap_few_shot"]["properties"]


def test_client_check_names_the_field_with_a_did_you_mean() -> None:
    # minibatch is a dspy MIPROv2.compile argument, but not one of our miprov2 params
    exc = refused({"minibatch": False})
    assert exc.errors == [{"field": "params.minibatch", "message": exc.errors[0]["message"]}]
    assert "unknown param 'minibatch' for optimizer 'miprov2'" in exc.errors[0]["message"]
    assert "num_trials" in exc.errors[0]["message"]  # the known keys are listed
    typo = refused({"num_trails": 5})
    assert typo.errors[0]["field"] == "params.num_trails" and "did you mean 'num_trials'?" in typo.errors[0]["message"]
    assert "params.num_trails" in str(typo)  # the one-line summary names it too
    bad_type = refused({"max_bootstrapped_demos": "x"}, "bootstrap_few_shot")
    assert [e["field"] for e in bad_type.errors] == ["params.max_bootstrapped_demos"]
    # common params are checked too, and every bad field is reported
    several = refused({"eval_chunk_size": 0, "auto": "huge", "seeed": 1})
    assert sorted(e["field"] for e in several.errors) == ["params.auto", "params.eval_chunk_size", "params.seeed"]
    # good params, and no published schema (no worker yet): nothing raised
    schema = params_schemas()["miprov2"]
    check_params({"auto": "medium", "num_trials": 4, "min_gain": 0, "val_fraction": 0.5, "seed": 3}, "miprov2", schema)
    check_params({"minibatch": False}, "miprov2", None)


def test_worker_refuses_unknown_keys_with_the_same_message() -> None:
    with pytest.raises(errors.ValidationError) as info:
        get_optimizer("miprov2").parse_params({"num_trails": 5, "max_labeled_demos": -1, "seed": 2})
    fields = {e["field"]: e["message"] for e in info.value.errors}
    assert set(fields) == {"params.num_trails", "params.max_labeled_demos"}
    assert "did you mean 'num_trials'?" in fields["params.num_trails"]


def test_an_optimizer_whose_model_ignores_extras_still_refuses_typos() -> None:
    class Lenient(pydantic.BaseModel):  # pydantic's default: extra keys silently ignored
        depth: int = 2

    class Open(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="allow")

    lenient = Optimizer("lenient_test", Lenient, lambda *a: (None, []), lambda *a: 0)
    with pytest.raises(errors.ValidationError, match="did you mean 'depth'"):
        lenient.parse_params({"dpeth": 3})
    assert lenient.params_schema()["additionalProperties"] is False
    with pytest.raises(errors.ValidationError, match="params.dpeth"):
        check_params({"dpeth": 3}, "lenient_test", lenient.params_schema())
    opened = Optimizer("open_test", Open, lambda *a: (None, []), lambda *a: 0)
    assert opened.parse_params({"anything": 1}).anything == 1  # extra="allow" is the optimizer's own choice
    check_params({"anything": 1}, "open_test", opened.params_schema())


def test_client_params_check_needs_neither_dspy_nor_pydantic_models() -> None:
    code = ("import sys, json\n"
            "from dspex_tasks.client import Client, _check_params\n"
            "schema = json.loads(sys.stdin.read())\n"
            "try:\n"
            "    _check_params({'minibatch': False}, 'miprov2', {'optimizer_params': {'miprov2': schema}})\n"
            "except Exception as exc:\n"
            "    print(exc.errors[0]['field'])\n"
            "assert 'dspy' not in sys.modules, 'the client check imported dspy'\n"
            "assert 'dspex_tasks.optimize.optimizers' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(params_schemas()["miprov2"]),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "params.minibatch"
