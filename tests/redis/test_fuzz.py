"""Random JSON at the client and at the task entry point: a typed error or a result, never a crash or a hang."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspex_tasks import errors
from dspex_tasks.client import Job

pytestmark = pytest.mark.redis

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
kwargs_strategy = st.dictionaries(
    st.sampled_from(["inputs", "session", "program", "extra", "question"]) | st.text(max_size=6), json_values,
    max_size=4,
) | st.fixed_dictionaries({"inputs": st.dictionaries(st.sampled_from(["question", "x"]), json_values, max_size=2),
                           "session": st.one_of(st.none(), st.text(max_size=10))})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kwargs=kwargs_strategy)
def test_random_kwargs_at_the_task_entry_point(worker_app: Any, kwargs: dict[str, Any]) -> None:
    json.dumps(kwargs)  # JSON only on the wire
    r = worker_app.send_task("dspex.qa", kwargs=kwargs)
    try:
        res = Job(r).get(timeout=20)
    except errors.TaskTimeout:
        raise AssertionError(f"hang for {kwargs!r}") from None
    except errors.DspexError:
        return
    assert isinstance(res.outputs["answer"], str)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs=json_values, session=st.one_of(st.none(), st.text(max_size=12)))
def test_random_inputs_at_the_client(client: Any, inputs: Any, session: Any) -> None:
    try:
        job = client.submit("qa", inputs, session=session)
    except (errors.ValidationError, errors.InvalidSession):
        return
    assert job.get(timeout=20).outputs
