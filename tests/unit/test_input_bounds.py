"""Ids of each kind, stream ids, JSON depth and non-finite numbers: typed errors, never a crash (issue 13, 11-12)."""

from __future__ import annotations

import math
import uuid
from typing import Any

import pytest

from dspex_tasks import errors, keys, wire
from dspex_tasks.gateway.sse import parse_stream_id
from dspex_tasks.optimize.datasets import validate_rows
from dspex_tasks.programs.store import MemoryProgramStore, check_state


def _nested(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize("bad", ["r1", "f49e8afebf76437b943fe49a4e9fd50e:ckpt:data", "10B2760D6F904DAB9C0FFDA9012C47B6", "0" * 33, "",
                                 "0" * 31 + "\n", None, 7])
def test_a_run_id_has_its_own_pattern_and_every_run_key_checks_it(bad: Any) -> None:
    good = uuid.uuid4().hex
    assert keys.check_id(good, "run") == good and keys.run("ns", good) == f"ns:run:{good}"
    with pytest.raises(errors.InvalidId, match="invalid run id") as info:
        keys.check_id(bad, "run")
    assert not isinstance(info.value, errors.InvalidSession)
    for build in (keys.run, keys.run_events, keys.run_lease, keys.run_pattern):
        with pytest.raises(errors.InvalidId):
            build("ns", bad)
    with pytest.raises(errors.InvalidId):
        keys.run_checkpoint("ns", bad, "candidate")
    assert keys.check_id("a:b.c-d", "dataset") == "a:b.c-d"  # other kinds keep the general alphabet


@pytest.mark.parametrize(("header", "expected"), [(None, "0-0"), ("", "0-0"), ("1700000000000-3", "1700000000000-3"),
                                                  ("0-0", "0-0"), (f"{2**64 - 1}-{2**64 - 1}", f"{2**64 - 1}-{2**64 - 1}")])
def test_a_last_event_id_is_parsed_as_a_stream_id(header: str | None, expected: str) -> None:
    assert parse_stream_id(header) == expected


@pytest.mark.parametrize("header", ["abc", "5", "1-2-3", f"{2**64}-0", "0-" + "9" * 20, "-1-0", "1-x", "１-２"])
def test_a_malformed_or_out_of_range_last_event_id_is_a_validation_error(header: str) -> None:
    with pytest.raises(errors.ValidationError) as info:
        parse_stream_id(header)
    assert info.value.errors[0]["field"] == "Last-Event-ID"


def test_deep_json_is_a_validation_error_naming_the_path_and_depth() -> None:
    wire.check_json(_nested(wire.MAX_JSON_DEPTH), "inputs")  # the cap itself is fine
    with pytest.raises(errors.ValidationError, match="deeper than 64 levels") as info:
        wire.check_json({"q": _nested(10_000)}, "inputs")
    assert info.value.errors[0]["field"].startswith("inputs.q.0.0")
    with pytest.raises(errors.ValidationError):
        wire.check_json(_nested(wire.MAX_JSON_DEPTH + 1), "inputs")


def test_non_finite_numbers_are_named_by_row_and_field() -> None:
    rows = [{"question": "q", "answer": "a"}, {"question": "q", "answer": "a", "n": [1.0, math.inf]}]
    wire.check_json(rows, "rows")  # allowed unless finite is asked for
    with pytest.raises(errors.ValidationError, match=r"rows\.1\.n\.1") as info:
        wire.check_json(rows, "rows", finite=True)
    assert info.value.errors == [{"field": "rows.1.n.1", "message": info.value.errors[0]["message"]}]
    desc = {"input_schema": {"type": "object", "properties": {"question": {"type": "string"}}, "required": ["question"]},
            "output_schema": {"type": "object", "properties": {"answer": {"type": "number"}}}}
    with pytest.raises(errors.ValidationError) as info:
        validate_rows([{"question": "q", "answer": 1.0}, {"question": "q", "answer": math.nan}], desc)
    assert info.value.errors[0]["field"] == "trainset.1.answer"
    with pytest.raises(errors.ValidationError, match="deeper than"):
        validate_rows([{"question": _nested(10_000), "answer": 1}], desc)


def test_deep_or_non_finite_program_state_is_a_validation_error() -> None:
    store = MemoryProgramStore()
    for state in ({"demos": [], "instructions": _nested(10_000)}, {"demos": [{"x": math.nan}]}):
        with pytest.raises(errors.ValidationError):
            check_state(state)
        with pytest.raises(errors.ValidationError):
            store.put("s1", "qa", state)


def test_client_bounds_countdown_chunk_size_and_depth_before_touching_redis() -> None:
    from dspex_tasks.client import Client
    from dspex_tasks.settings import Settings

    with Client(settings=Settings(redis_url="redis://127.0.0.1:1/0")) as client:  # nothing listens: no I/O happens
        for countdown in (math.nan, math.inf, -1, 1e12, True):
            with pytest.raises(errors.ValidationError, match="countdown"):
                client.submit("qa", {"question": "q"}, countdown=countdown)
        with pytest.raises(errors.ValidationError, match="deeper than 64"):
            client.submit("qa", {"question": _nested(10_000)})
        for size in (0, -1, 1.5):
            with pytest.raises(errors.ValidationError, match="chunk_size"):
                client.map("qa", [{"question": "q"}], chunk_size=size)  # type: ignore[arg-type]
        with pytest.raises(errors.ValidationError, match=r"item 1") as info:
            client.map("qa", [{"question": "q"}, {"question": _nested(10_000)}])
        assert info.value.errors[0]["field"].startswith("1.question.0")
        with pytest.raises(errors.ValidationError, match="deeper than 64"):
            client.optimize("qa", [{"question": "q", "answer": "a"}], params={"x": _nested(10_000)})
