"""Property tests: random signatures round-trip, and MockLM answers them validly through DSPy."""

from __future__ import annotations

import keyword
from typing import Any

import dspy
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspex_tasks.dsl.signature import RESERVED, SignatureRegistry, signature
from dspex_tasks.dsl.types import DSPEX_SCALARS, SCALARS
from dspex_tasks.testing.mock_lm import MockLM
from tests._values import plain as _plain

pytestmark = pytest.mark.unit

# A type is drawn as a pair (Python spelling, DSPex spelling) of the same type.
Pair = tuple[str, str]
_PY_TO_DSPEX = {"str": ":string", "int": ":integer", "float": ":float", "bool": ":boolean", "any": ":any",
                "dict": ":map", "embedding": ":embedding", "confidence_score": ":confidence_score",
                "probability": ":probability", "reasoning_chain": ":reasoning_chain", "entity": ":entity"}
assert set(_PY_TO_DSPEX) <= set(SCALARS) and set(_PY_TO_DSPEX.values()) <= set(DSPEX_SCALARS)

# ... plus the table's aliases: ``:atom`` is a string, a bare ``list`` is a list of anything.
scalars: st.SearchStrategy[Pair] = st.sampled_from([*sorted(_PY_TO_DSPEX.items()), ("str", ":atom"),
                                                    ("list", "{:list, :any}")])
literal_values = st.lists(st.text(alphabet="abcdefghij", min_size=1, max_size=5), min_size=1, max_size=3, unique=True)
names = st.from_regex(r"x[a-z0-9]{0,8}", fullmatch=True).filter(lambda n: not keyword.iskeyword(n) and n not in RESERVED)


def _literal(values: list[str]) -> Pair:
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"literal[{quoted}]", f"{{:literal, [{quoted}]}}"


def _composites(inner: st.SearchStrategy[Pair]) -> st.SearchStrategy[Pair]:
    return st.one_of(
        inner.map(lambda t: (f"list[{t[0]}]", f"{{:list, {t[1]}}}")),
        inner.map(lambda t: (f"dict[str, {t[0]}]", f"{{:dict, :string, {t[1]}}}")),
        st.tuples(literal_values, inner).map(
            lambda lt: (f"dict[{_literal(lt[0])[0]}, {lt[1][0]}]", f"{{:dict, {_literal(lt[0])[1]}, {lt[1][1]}}}")),
        inner.map(lambda t: (f"optional[{t[0]}]", f"{{:optional, {t[1]}}}")),
        st.lists(inner, min_size=2, max_size=3).map(
            lambda ts: (" | ".join(t[0] for t in ts), "{:union, [" + ", ".join(t[1] for t in ts) + "]}")),
    )


types: st.SearchStrategy[Pair] = st.recursive(scalars | literal_values.map(_literal), _composites, max_leaves=6)


@st.composite
def specs(draw: st.DrawFn) -> tuple[str, str]:
    """A signature spec in Python spelling and the same one in (mostly) DSPex spelling."""
    field_names = draw(st.lists(names, min_size=2, max_size=6, unique=True))
    n_in = draw(st.integers(1, len(field_names) - 1))
    fields = [(n, draw(types)) for n in field_names]
    mixed = [draw(st.booleans()) for _ in fields]  # mix spellings across fields too

    def side(items: list[tuple[str, Pair]], dspex: bool) -> str:
        return ", ".join(f"{n}: {t[1] if dspex and m else t[0]}" for (n, t), m in zip(items, mixed, strict=False))

    py = f"{side(fields[:n_in], False)} -> {side(fields[n_in:], False)}"
    dx = f"{side(fields[:n_in], True)} -> {side(fields[n_in:], True)}"
    return py, dx




def _inputs(sig: Any) -> dict[str, Any]:
    from dspex_tasks.testing import mockgen

    return {name: mockgen.value_for(node, f"input|{name}") for name, node in sig.input_types.items()}


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), use_registry=st.booleans(), json_adapter=st.booleans(), seed=st.integers(0, 5))
def test_random_signatures_round_trip_and_mock_answers_validate(
    spec: tuple[str, str], use_registry: bool, json_adapter: bool, seed: int
) -> None:
    py, dx = spec
    sig = signature(py, name="prop_sig", register=False)
    assert signature(dx, name="prop_sig", register=False) == sig  # both spellings, same signature
    assert signature(sig.spec, name="prop_sig", register=False) == sig  # spec -> Signature -> .spec

    reg = SignatureRegistry()
    if use_registry:
        reg.add(sig)
    adapter = dspy.JSONAdapter() if json_adapter else dspy.ChatAdapter(use_json_adapter_fallback=False)
    inputs = sig.validate_inputs(_inputs(sig))
    with dspy.context(lm=MockLM(seed=seed, registry=reg), adapter=adapter):
        pred = dspy.Predict(sig.to_dspy())(**inputs)
    validated = sig.validate_outputs({k: _plain(pred[k]) for k in sig.output_fields})
    jsonschema.Draft202012Validator(sig.output_schema()).validate(validated)
