"""What the Redis transport sets aside before kombu builds a message from a queue entry (worker/fetch.py)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from dspex_tasks.worker.fetch import _bad_payload

pytestmark = pytest.mark.unit


def _payload(**over: Any) -> dict[str, Any]:
    p: dict[str, Any] = {"body": base64.b64encode(b"[[], {}, {}]").decode(), "headers": {"id": "t"},
                         "properties": {"body_encoding": "base64", "delivery_tag": "d",
                                        "delivery_info": {"exchange": "", "routing_key": "q"}}}
    p.update(over)
    return p


def test_a_kombu_message_passes() -> None:
    assert _bad_payload(_payload()) is None
    assert _bad_payload(_payload(body="")) is None  # an empty body is kombu's to judge


@pytest.mark.parametrize(("payload", "reason"), [
    (None, "no properties"),
    ([1, 2], "no properties"),
    ({"properties": "x"}, "no properties"),
    (_payload(properties={"delivery_tag": "d", "body_encoding": "base64"}), "no delivery_info"),
    (_payload(headers=["not", "a", "dict"]), "headers"),
    (_payload(body="%%% not base64"), "not base64"),
    (_payload(body=42), "not base64"),
    (_payload(properties={"delivery_tag": "d", "body_encoding": "rot13",
                          "delivery_info": {"exchange": "", "routing_key": "q"}}), "unknown body_encoding"),
])
def test_what_kombu_cannot_build_a_message_from_is_named(payload: Any, reason: str) -> None:
    why = _bad_payload(payload)
    assert why is not None and reason in why
