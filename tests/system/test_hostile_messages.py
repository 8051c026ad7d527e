"""Hostile broker messages, pushed by hand into the queue of a real worker: malformed envelopes, a compression
bomb and oversized payloads are refused, dead-lettered and acknowledged, and the same worker keeps serving.

Each envelope is what kombu's Redis transport LPUSHes (a JSON dict with a base64 body), so nothing on the
sending side can tidy it up first.
"""

from __future__ import annotations

import base64
import json
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from dspex_tasks.client import Client
from dspex_tasks.testing.redis_server import RedisServer
from dspex_tasks.worker.guard import dead_letters
from tests._procs import WorkerProcess, wait_for

pytestmark = pytest.mark.system

NS = "dspex"
QUEUE = "dspex.predict"
VALID_BODY = json.dumps([[], {"inputs": {"question": "hi"}}, {"callbacks": None, "errbacks": None,
                                                              "chain": None, "chord": None}]).encode()


@pytest.fixture
def private_redis() -> Iterator[str]:
    with RedisServer() as server:
        yield str(server.url)


def envelope(body: bytes, *, task_id: str | None, content_type: str = "application/json",
             **headers: Any) -> str:
    """A kombu Redis-transport message, as ``Channel._put`` stores it."""
    head = {"lang": "py", "task": "dspex.qa", "id": task_id, "root_id": task_id, "parent_id": None, "group": None,
            "retries": 0, "eta": None, "expires": None, "timelimit": [None, None], "argsrepr": "()",
            "kwargsrepr": "{}", "origin": "hostile"}
    if task_id is None:
        del head["id"]
    head.update(headers)
    return json.dumps({
        "body": base64.b64encode(body).decode(), "content-encoding": "utf-8", "content-type": content_type,
        "headers": head,
        "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2, "body_encoding": "base64",
                       "delivery_tag": str(uuid.uuid4()), "delivery_info": {"exchange": "", "routing_key": QUEUE},
                       "priority": 0},
    })


MALFORMED: dict[str, tuple[bytes, dict[str, Any]]] = {
    "json_object_body": (b'{"inputs": {"question": "hi"}}', {}),
    "two_element_body": (b'[[], {"inputs": {"question": "hi"}}]', {}),
    "string_body": (b'"hello"', {}),
    "kwargs_not_a_mapping": (b'[[], ["inputs"], {}]', {}),
    "not_json": (b"{not json", {}),
    "empty_content_type": (VALID_BODY, {"content_type": ""}),
    "application_data": (VALID_BODY, {"content_type": "application/data"}),
    "timelimit_not_numeric": (VALID_BODY, {"timelimit": "soon"}),
    "no_task_id": (VALID_BODY, {"task_id": None}),
}


def _rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # the peak resident set since the process started
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _settled(r: Any) -> bool:
    return r.llen(QUEUE) == 0 and r.hlen("unacked") == 0


def test_hostile_messages_are_dead_lettered_and_the_same_worker_keeps_serving(private_redis: str,
                                                                               tmp_path: Path) -> None:
    from celery import Celery

    w = WorkerProcess(private_redis, NS, concurrency=4, log_dir=tmp_path, name="hostile")
    client = Client(redis_url=private_redis)
    bare = Celery(broker=private_redis, backend=private_redis)  # a raw sender: no client-side checks
    r = redis_lib.Redis.from_url(private_redis)
    try:
        w.wait_ready(timeout_s=60)
        pid = w.pid
        # Given one envelope per malformed variant, each with its own task id (but the one that has none)
        sent: dict[str, str | None] = {}
        for name, (body, opts) in MALFORMED.items():
            opts = dict(opts)
            tid = opts.pop("task_id", f"bad-{name}")
            sent[name] = tid
            r.lpush(QUEUE, envelope(body, task_id=tid, content_type=opts.pop("content_type", "application/json"),
                                    **opts))
        # and a compression bomb: 200 MB of zeros in a ~200 KB zlib body
        bomb = zlib.compress(b"\0" * 200_000_000, 9)
        assert len(bomb) < 300_000
        r.lpush(QUEUE, envelope(bomb, task_id="bad-gzip-bomb", compression="application/x-gzip"))
        sent["gzip_bomb"] = "bad-gzip-bomb"
        # and entries kombu's own transport cannot even read (it crashed the worker before any hook): not JSON,
        # a body that is not base64, an unknown body encoding, no delivery_info
        r.lpush(QUEUE, b"\xff\xfe not json at all")
        bad_b64 = json.loads(envelope(b"[[], {}, {}]", task_id="bad-base64"))
        bad_b64["body"] = "%%% not base64 %%%"
        r.lpush(QUEUE, json.dumps(bad_b64))
        odd_enc = json.loads(envelope(b"[[], {}, {}]", task_id="bad-encoding"))
        odd_enc["properties"]["body_encoding"] = "rot13"
        r.lpush(QUEUE, json.dumps(odd_enc))
        no_info = json.loads(envelope(b"[[], {}, {}]", task_id="bad-no-info"))
        del no_info["properties"]["delivery_info"]
        r.lpush(QUEUE, json.dumps(no_info))
        # and payloads over the cap: 5 MB (past the raw-body cap) and 1.5 MB (past DSPEX_MAX_PAYLOAD_BYTES only)
        huge = bare.send_task("dspex.qa", kwargs={"inputs": {"question": "x" * 5_000_000}}, queue=QUEUE)
        large = bare.send_task("dspex.qa", kwargs={"inputs": {"question": "y" * 1_500_000}}, queue=QUEUE)

        # When a valid task follows them
        ok = client.submit("qa", {"question": "after the hostile ones"})
        assert ok.get(timeout=30).outputs

        # Then the same worker process served it, and never crashed
        assert w.proc.poll() is None and w.pid == pid
        assert json.loads(r.get(f"celery-task-meta-{ok.id}") or b"{}")["worker"] == w.hostname
        assert "Unrecoverable error" not in w.log()
        # each malformed message is dead-lettered with a reason, and acknowledged
        wait_for(lambda: _settled(r), timeout_s=15, what="queue and unacked hash empty")
        letters = dead_letters(r, NS, limit=1000)
        for name, tid in sent.items():
            found = [d for d in letters if d.get("task_id") == tid and d.get("reason") and d.get("task")]
            assert found, f"{name} not dead-lettered: {letters}"
            assert found[0]["task"] == "dspex.qa"
        assert any(d.get("task_id") == huge.id and "bytes" in d["reason"] for d in letters)
        assert any(d.get("raw", "").endswith("not json at all") and "not a message" in d["reason"] for d in letters)
        for tid, reason in (("bad-base64", "not base64"), ("bad-encoding", "body_encoding"),
                            ("bad-no-info", "not a message")):
            assert any(d.get("task_id") == tid and reason in d["reason"] for d in letters), (tid, letters[:8])
        # the bomb was never inflated
        assert _rss_peak_mb(pid) < 300, f"worker peaked at {_rss_peak_mb(pid):.0f} MB"
        # refused payloads fail clearly, and their failure records do not hold them
        for res in (huge, large):
            wait_for(lambda res=res: r.exists(f"celery-task-meta-{res.id}"), timeout_s=10, what="failure stored")
            assert res.state == "FAILURE"
            assert r.strlen(f"celery-task-meta-{res.id}") < 10_000
    finally:
        r.close()
        bare.close()
        client.close()
        w.stop()
