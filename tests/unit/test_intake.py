"""The checks a worker runs on a broker message before Celery builds a request from it."""

from __future__ import annotations

import bz2
import zlib
from typing import Any

import pytest
from kombu import compression

from dspex_tasks.app import celery_config
from dspex_tasks.settings import Settings
from dspex_tasks.worker.guard import DspexTask
from dspex_tasks.worker.intake import (
    body_cap,
    check_body,
    check_headers,
    decompressors,
    install_decompression,
)

GOOD_HEADERS = {"id": "t1", "task": "dspex.qa", "root_id": "t1", "parent_id": None, "group": None, "retries": 0,
                "timelimit": [None, None], "shadow": None}


def test_celery_protocol_2_messages_pass() -> None:
    assert check_headers(GOOD_HEADERS) is None
    assert check_headers({**GOOD_HEADERS, "timelimit": [30, 25.5]}) is None
    assert check_body([[], {"inputs": {"q": 1}}, {"callbacks": None, "errbacks": None, "chain": None,
                                                  "chord": None}]) is None
    assert check_body(([1], {}, None)) is None


@pytest.mark.parametrize(("headers", "says"), [
    ("not a dict", "mapping"),
    ({**GOOD_HEADERS, "id": None}, "'id'"),
    ({**GOOD_HEADERS, "id": ""}, "'id'"),
    ({**GOOD_HEADERS, "task": 3}, "'task'"),
    ({**GOOD_HEADERS, "timelimit": "soon"}, "'timelimit'"),
    ({**GOOD_HEADERS, "timelimit": [1]}, "'timelimit'"),
    ({**GOOD_HEADERS, "timelimit": ["1", None]}, "'timelimit'"),
    ({**GOOD_HEADERS, "timelimit": [True, None]}, "'timelimit'"),
    ({**GOOD_HEADERS, "retries": "2"}, "'retries'"),
    ({**GOOD_HEADERS, "retries": -1}, "'retries'"),
    ({**GOOD_HEADERS, "root_id": 5}, "'root_id'"),
])
def test_bad_headers_are_named(headers: Any, says: str) -> None:
    problem = check_headers(headers)
    assert problem is not None and says in problem


@pytest.mark.parametrize(("body", "says"), [
    ({"inputs": {}}, "got dict"),
    ([[], {}], "got 2 elements"),
    ("hello", "got str"),
    (b"raw", "got bytes"),
    (None, "got NoneType"),
    (["a", {}, None], "args"),
    ([[], ["inputs"], None], "kwargs"),
    ([[], {}, "x"], "embed"),
    ([[], {}, {"callbacks": "x"}], "'callbacks'"),
    ([[], {}, {"chord": []}], "'chord'"),
])
def test_bodies_outside_the_protocol_are_named(body: Any, says: str) -> None:
    problem = check_body(body)
    assert problem is not None and says in problem


def test_body_cap_is_twice_the_payload_cap() -> None:
    assert body_cap(1_000_000) == 2_000_000


def test_compression_is_refused_unless_accepted_and_then_bounded() -> None:
    small, bomb = zlib.compress(b"a" * 100), zlib.compress(b"\0" * 10_000_000)
    off = decompressors(False, 1000)
    assert set(off) == set(compression.encoders())
    with pytest.raises(ValueError, match="DSPEX_ACCEPT_COMPRESSION"):
        off["application/x-gzip"](small)
    on = decompressors(True, 100_000)
    assert on["application/x-gzip"](small) == b"a" * 100
    assert on["application/x-bz2"](bz2.compress(b"b" * 10)) == b"b" * 10
    with pytest.raises(ValueError, match="inflates past 100000"):
        on["application/x-gzip"](bomb)
    with pytest.raises(ValueError, match="compressed body of"):
        on["application/x-gzip"](b"\0" * 100_001)


def test_install_replaces_kombus_decompressors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compression, "_decoders", dict(compression._decoders))
    install_decompression(False, 1000)
    with pytest.raises(ValueError, match="refused"):
        compression.decompress(zlib.compress(b"x"), "gzip")


def test_workers_use_the_checking_strategy_and_consumer() -> None:
    assert DspexTask.Strategy == "dspex_tasks.worker.intake:strategy"
    assert celery_config(Settings())["worker_consumer"] == "dspex_tasks.worker.intake:Consumer"
    assert Settings().accept_compression is False
