"""Layer 2: the list of recent jobs (``GET /v1/jobs`` and the console's table): each key sees its own, newest first,
admin every key's; limit, filters and scope are enforced, and each row's state follows its result.

The fixtures are ``test_gateway``'s, instantiated anew for this module (its own namespace, worker and gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from dspex_tasks import keys
from dspex_tasks.gateway.auth import KeyStore, hash_key
from tests.redis import test_gateway as shared
from tests.redis.test_gateway import Served

gw_settings, gw_worker, redis_module = shared.gw_settings, shared.gw_worker, shared.redis_module
_started, serve, gw, key_store = shared._started, shared.serve, shared.gw, shared.key_store

pytestmark = pytest.mark.redis

COMPLEX = {"text": "Ada Lovelace wrote the first program.", "context": ["history"]}


@pytest.fixture(scope="module")
def make_key(key_store: KeyStore) -> Callable[..., tuple[str, str]]:
    def make(name: str, **scopes: Any) -> tuple[str, str]:
        raw, record = key_store.create(name, **scopes)
        return raw, record.id

    return make


def submit(c: httpx.Client, signature: str = "qa", session: str | None = None) -> str:
    inputs = COMPLEX if signature == "complex_analysis" else {"question": f"Why {uuid.uuid4().hex[:6]}?"}
    body: dict[str, Any] = {"inputs": inputs}
    if session is not None:
        body["session"] = session
    r = c.post(f"/v1/signatures/{signature}/jobs", json=body)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def listed(c: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    r = c.get("/v1/jobs", params=params)
    assert r.status_code == 200, r.text
    jobs: list[dict[str, Any]] = r.json()["jobs"]
    assert all(set(j) == {"id", "signature", "session", "created_at", "state"} for j in jobs), jobs
    return jobs


def ids(jobs: list[dict[str, Any]]) -> list[str]:
    return [j["id"] for j in jobs]


def test_each_key_lists_its_own_jobs_newest_first_and_admin_lists_all(gw: Served, make_key: Callable[..., Any],
                                                                       redis_module: Any) -> None:
    a_raw, a_id = make_key("list-a", sessions=["jl-a*", "@default"])
    b_raw, _ = make_key("list-b", sessions=["jl-b*", "@default"])
    admin, _ = make_key("list-root", rights=["admin"])
    # Given jobs submitted by two keys, interleaved
    with gw.client(a_raw) as a, gw.client(b_raw) as b:
        a1 = submit(a)
        b1 = submit(b, session="jl-b-1")
        a2 = submit(a, session="jl-a-1")
        a3 = submit(a, "complex_analysis", session="jl-a-2")
        b2 = submit(b)
        # each key lists only its own, newest first
        mine = listed(a)
        assert ids(mine) == [a3, a2, a1]
        assert [(j["signature"], j["session"]) for j in mine] == [("complex_analysis", "jl-a-2"), ("qa", "jl-a-1"),
                                                                 ("qa", None)]
        assert ids(listed(b)) == [b2, b1]
        # limit keeps the newest; the filters keep what matches
        assert ids(listed(a, limit=2)) == [a3, a2]
        assert ids(listed(a, session="jl-a-1")) == [a2]
        assert ids(listed(a, signature="complex_analysis")) == [a3]
        assert ids(listed(a, signature="qa", limit=1)) == [a2]
        assert listed(a, session="jl-a-9") == []
        # a session outside the key's scope, named: 403 naming it (as on every route)
        r = b.get("/v1/jobs", params={"session": "jl-a-1"})
        assert r.status_code == 403 and r.json()["session"] == "jl-a-1", r.text
    with gw.client(admin) as root:
        everyone = listed(root, limit=200)
        assert ids(everyone)[:5] == [b2, a3, a2, b1, a1]
        stamps = [j["created_at"] for j in everyone]
        assert stamps == sorted(stamps, reverse=True)
        assert ids(listed(root, session="jl-b-1")) == [b1]
    # the indexes are bounded in time: they expire with the records
    for index in (keys.gateway_jobs(gw.settings.namespace), keys.gateway_key_jobs(gw.settings.namespace, a_id)):
        assert 0 < redis_module.ttl(index) <= gw.settings.result_expires_s
    # When key A's scope shrinks to the default program, its jobs in the sessions it lost drop out of its list
    stored = keys.gateway_api_keys(gw.settings.namespace)
    record = json.loads(redis_module.hget(stored, hash_key(a_raw)))
    redis_module.hset(stored, hash_key(a_raw), json.dumps({**record, "sessions": ["@default"]}))
    with gw.client(a_raw) as a:
        assert ids(listed(a)) == [a1]
        assert a.get(f"/v1/jobs/{a2}").status_code == 404  # as when read by id


def test_a_bad_limit_or_filter_is_a_422_naming_the_field(gw: Served, make_key: Callable[..., Any]) -> None:
    raw, _ = make_key("list-bad")
    with gw.client(raw) as c:
        for params, field in (({"limit": 0}, "limit"), ({"limit": 201}, "limit"), ({"limit": "many"}, "limit"),
                              ({"session": "bad id"}, "session"), ({"signature": "9lives"}, "signature")):
            r = c.get("/v1/jobs", params=params)
            assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
            assert [e["field"] for e in r.json()["errors"]] == [field], r.text
    with gw.client() as anon:
        assert anon.get("/v1/jobs").status_code == 401
    writer_only, _ = make_key("list-none", rights=["write"])
    with gw.client(writer_only) as c:
        r = c.get("/v1/jobs")
        assert r.status_code == 403 and r.json()["right"] == "read"


def test_the_state_follows_the_worker_and_the_stored_result(gw: Served, make_key: Callable[..., Any],
                                                            redis_module: Any) -> None:
    import redis.asyncio as aredis

    from dspex_tasks.gateway.results import Hub, JobReader

    raw, key_id = make_key("list-state")
    with gw.client(raw) as c:
        # a job the worker runs: PENDING (or further) at first, SUCCESS once it ran
        job = submit(c)
        deadline = time.monotonic() + 60
        while (state := listed(c)[0]["state"]) != "SUCCESS":
            assert state in ("PENDING", "RECEIVED", "STARTED", "PROGRESS"), state
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
        assert listed(c)[0]["id"] == job
    # a job no worker took yet (recorded as the gateway records one): PENDING until its result meta says more
    celery_app = gw.app.state.gateway.client.app
    ghost = uuid.uuid4().hex

    async def record() -> None:
        r = aredis.Redis.from_url(gw.settings.redis_url)
        try:
            reader = JobReader(celery_app=celery_app, aredis=r, hub=Hub(r), namespace=gw.settings.namespace,
                               record_ttl_s=gw.settings.result_expires_s)
            await reader.record(ghost, "qa", key_id, None)
        finally:
            await r.aclose()

    asyncio.run(record())
    with gw.client(raw) as c:
        assert [(j["id"], j["state"]) for j in listed(c)][:2] == [(ghost, "PENDING"), (job, "SUCCESS")]
        celery_app.backend.store_result(ghost, {"outputs": {"answer": "x"}}, "STARTED")
        assert listed(c)[0]["state"] == "STARTED"
        celery_app.backend.store_result(ghost, {"outputs": {"answer": "x"}}, "SUCCESS")
        assert listed(c)[0]["state"] == "SUCCESS"
        # a job whose record expired is left out (its id lingers in the index until the next submit trims it)
        redis_module.delete(keys.gateway_job(gw.settings.namespace, ghost))
        assert ids(listed(c)) == [job]


@contextlib.contextmanager
def _console(gw: Served, raw: str) -> Iterator[httpx.Client]:
    """An HTTP client logged in to the console with ``raw`` (its cookie kept)."""
    with httpx.Client(base_url=gw.url, timeout=30, follow_redirects=False) as c:
        r = c.post("/console/login", data={"key": raw, "next": "/console/"})
        assert r.status_code == 303 and "dspex_console" in r.cookies, r.text
        yield c


def _rows(html: str) -> list[str]:
    return re.findall(r'<tr data-job="([^"]+)">', html)


def test_the_console_shows_each_key_its_recent_jobs_and_refreshes_them(gw: Served,
                                                                        make_key: Callable[..., Any]) -> None:
    a_raw, _ = make_key("console-list-a", sessions=["cl-a*", "@default"])
    b_raw, _ = make_key("console-list-b")
    admin, _ = make_key("console-list-root", rights=["admin"])
    with gw.client(a_raw) as a, gw.client(b_raw) as b:
        a1 = submit(a)
        b1 = submit(b)
        a2 = submit(a, "complex_analysis", session="cl-a-1")
    with _console(gw, a_raw) as c:
        # the jobs page: the form, then the table (in its scroll box), refreshed by htmx every 3 s
        html = c.get("/console/jobs").text
        assert "Recent jobs" in html and 'hx-get="/console/jobs/recent"' in html and 'hx-trigger="every 3s"' in html
        assert _rows(html) == [a2, a1] and f'href="/console/jobs/{a2}"' in html
        assert '<div class="scroll"><table class="jobs">' in html
        # the fragment: the table alone, with the same rows and state badges
        r = c.get("/console/jobs/recent")
        assert r.status_code == 200 and "<html" not in r.text and r.text.lstrip().startswith('<div class="scroll">')
        assert _rows(r.text) == [a2, a1] and re.search(r'<span class="status (pending|started|success)">', r.text)
        # filters keep what matches, in the refresh URL too
        html = c.get("/console/jobs", params={"list_signature": "complex_analysis"}).text
        assert _rows(html) == [a2] and 'hx-get="/console/jobs/recent?list_signature=complex_analysis"' in html
        assert _rows(c.get("/console/jobs/recent", params={"list_session": "cl-a-1"}).text) == [a2]
        # a session out of scope or malformed: said above an empty table, not a broken page
        for bad in ("cl-b-1", "bad id"):
            r = c.get("/console/jobs", params={"list_session": bad})
            assert r.status_code == 200 and _rows(r.text) == [] and 'class="error" role="alert"' in r.text
        # /console/jobs/recent is not taken for a job id
        assert c.get("/console/jobs/not-a-job").status_code == 404
    with _console(gw, b_raw) as c:
        assert _rows(c.get("/console/jobs/recent").text) == [b1]
    with _console(gw, admin) as c:
        assert _rows(c.get("/console/jobs/recent").text)[:3] == [a2, b1, a1]
