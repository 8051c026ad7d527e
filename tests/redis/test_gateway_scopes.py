"""Layer 2: API key scopes at the gateway (rights and sessions), checked on every route; least privilege by default.

The gateway, the worker and the keys are the module's own (fixtures shared with ``test_gateway``: a real uvicorn
server in a thread, a real Redis, an in-process worker). Sessions are named ``team-a-*`` and ``team-b-*``; a key
scoped to ``team-a*`` stands for team A's service.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from dspex_tasks import keys
from dspex_tasks.gateway.auth import KeyStore
from dspex_tasks.optimize.runs import RunStore
from tests._procs import ROOT, worker_env
from tests.redis import test_gateway as shared
from tests.redis.test_gateway import Served

# The gateway module's fixtures, instantiated anew for this module (its own namespace, worker and gateway).
gw_settings, gw_worker, redis_module = shared.gw_settings, shared.gw_worker, shared.redis_module
_started, serve, gw = shared._started, shared.serve, shared.gw

pytestmark = pytest.mark.redis

ROWS = [{"question": f"q{i}", "answer": "a"} for i in range(4)]


@pytest.fixture(scope="module")
def store(redis_module: Any, gw_settings: Any) -> KeyStore:
    return KeyStore(redis=redis_module, namespace=gw_settings.namespace)


@pytest.fixture(scope="module")
def make_key(store: KeyStore) -> Callable[..., str]:
    def make(name: str, **scopes: Any) -> str:
        raw, _ = store.create(name, **scopes)
        return raw

    return make


@pytest.fixture(scope="module")
def admin(make_key: Callable[..., str]) -> str:
    return make_key("root", rights=["admin"])


def submit(c: httpx.Client, session: str | None = None) -> str:
    body: dict[str, Any] = {"inputs": {"question": "Why?"}}
    if session is not None:
        body["session"] = session
    r = c.post("/v1/signatures/qa/jobs", json=body)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def forbidden(r: httpx.Response, **named: str) -> dict[str, Any]:
    """A 403 problem naming what is missing (``right=...`` or ``session=...``) and how to grant it."""
    assert r.status_code == 403, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert body["code"] == "forbidden" and "dspex keys grant" in body["detail"], body
    for field, value in named.items():
        assert body.get(field) == value, (field, body)
    return body


def not_found(r: httpx.Response, code: str) -> None:
    assert r.status_code == 404, (r.status_code, r.text)
    assert r.json()["code"] == code


def test_a_new_key_has_least_privilege_and_the_refusal_says_how_to_grant_more(gw: Served, store: KeyStore) -> None:
    # Given a key created with no scopes
    raw, record = store.create("newbie")
    assert record.rights == ("read", "write") and record.sessions == ("@default",) and not record.legacy
    with gw.client(raw) as c:
        # it runs and reads the default programs (no session): its own jobs
        job = submit(c)
        assert c.get(f"/v1/jobs/{job}").status_code == 200
        assert c.get("/v1/signatures").status_code == 200
        # but names no session, and administers nothing
        body = forbidden(c.post("/v1/signatures/qa/jobs", json={"inputs": {"question": "q"}, "session": "team-a-1"}),
                         session="team-a-1")
        assert record.id in body["detail"] and "--sessions team-a-1" in body["detail"]
        forbidden(c.get("/v1/sessions/team-a-1/programs"), session="team-a-1")
        forbidden(c.delete("/v1/sessions/team-a-1"), right="admin")
        assert c.get("/v1/sessions").json() == {"items": []}
    # When an operator grants the session, the same key uses it at once
    granted = store.grant(record.id, sessions=["team-a-1"])
    assert granted.sessions == ("@default", "team-a-1") and granted.rights == ("read", "write")
    with gw.client(raw) as c:
        submit(c, "team-a-1")


def test_a_team_key_cannot_see_or_change_another_teams_session(gw: Served, make_key: Callable[..., str],
                                                               admin: str) -> None:
    team_a = make_key("team-a", sessions=["team-a*"], rights=["read", "write"])
    team_b = make_key("team-b", sessions=["team-b*"], rights=["read", "write"])
    with gw.client(admin) as root:
        for session in ("team-a-1", "team-b-1"):
            assert root.put(f"/v1/sessions/{session}/programs/qa", json={"state": {"demos": []}}).status_code == 200
    with gw.client(team_b) as b:
        job_b = submit(b, "team-b-1")
        assert b.get(f"/v1/jobs/{job_b}").status_code == 200
    with gw.client(team_a) as a:
        # another team's job: 404, exactly as an unknown id (its existence is not leaked)
        for path in (f"/v1/jobs/{job_b}", f"/v1/jobs/{job_b}/events", f"/v1/signatures/qa/jobs/{job_b}"):
            not_found(a.get(path), "job_not_found")
        assert a.get(f"/v1/jobs/{job_b}").json()["detail"].replace(job_b, "X") == \
            a.get("/v1/jobs/no-such-job").json()["detail"].replace("no-such-job", "X")
        # another team's session, named explicitly: 403 naming it
        forbidden(a.put("/v1/sessions/team-b-1/programs/qa", json={"state": {"demos": []}}), session="team-b-1")
        forbidden(a.get("/v1/sessions/team-b-1/programs/qa"), session="team-b-1")
        forbidden(a.get("/v1/sessions/team-b-1/programs/qa/history"), session="team-b-1")
        forbidden(a.post("/v1/sessions/team-b-1/programs/qa/rollback", json={"version": 1}), session="team-b-1")
        forbidden(a.post("/v1/signatures/qa:run", json={"inputs": {"question": "q"}, "session": "team-b-1"}),
                  session="team-b-1")
        forbidden(a.delete("/v1/sessions/team-b-1"), right="admin")
        forbidden(a.delete("/v1/sessions/team-a-1/programs/qa"), right="admin")  # deleting history is admin's
        # the default program is not in its scope either (only team-a*)
        forbidden(a.post("/v1/signatures/qa/jobs", json={"inputs": {"question": "q"}}), session="@default")
        # its own sessions: a prefix pattern matches every session that starts with it
        assert a.put("/v1/sessions/team-a-1/programs/qa", json={"state": {"demos": []}}).json()["version"] == 2
        assert a.post("/v1/sessions/team-a-1/programs/qa/rollback", json={"version": 1}).status_code == 200
        job_a = submit(a, "team-abc")
        assert a.get(f"/v1/jobs/{job_a}").status_code == 200
        listed = a.get("/v1/sessions").json()["items"]
        assert "team-a-1" in listed and "team-b-1" not in listed
    with gw.client(team_b) as b:
        not_found(b.get(f"/v1/jobs/{job_a}"), "job_not_found")
    with gw.client(admin) as root:
        assert {"team-a-1", "team-b-1"} <= set(root.get("/v1/sessions").json()["items"])


def test_a_key_cannot_read_another_keys_jobs_in_the_same_session(gw: Served, make_key: Callable[..., str]) -> None:
    first = make_key("a-first", sessions=["team-a*"])
    second = make_key("a-second", sessions=["team-a*"])
    with gw.client(first) as c:
        job = submit(c, "team-a-2")
    with gw.client(second) as c:
        not_found(c.get(f"/v1/jobs/{job}"), "job_not_found")
        not_found(c.get(f"/v1/jobs/{job}/events"), "job_not_found")


def test_a_read_only_key_cannot_submit_or_change_anything(gw: Served, make_key: Callable[..., str],
                                                          admin: str) -> None:
    reader = make_key("reader", sessions=["*"], rights=["read"])
    with gw.client(admin) as root:
        root.put("/v1/sessions/team-r/programs/qa", json={"state": {"demos": []}})
    with gw.client(reader) as c:
        body = forbidden(c.post("/v1/signatures/qa/jobs", json={"inputs": {"question": "q"}}), right="write")
        assert "--rights write" in body["detail"]
        forbidden(c.post("/v1/signatures/qa:run", json={"inputs": {"question": "q"}}), right="write")
        forbidden(c.put("/v1/sessions/team-r/programs/qa", json={"state": {"demos": []}}), right="write")
        forbidden(c.post("/v1/sessions/team-r/programs/qa/rollback", json={"version": 1}), right="write")
        forbidden(c.post("/v1/optimizations", json={"signature": "qa", "trainset": ROWS, "session": "team-r"}),
                  right="write")
        # reading is what it may do
        assert c.get("/v1/sessions/team-r/programs/qa").status_code == 200
        assert c.get("/v1/signatures/qa").status_code == 200


def test_jobs_from_outside_the_gateway_are_admins_only(gw: Served, make_key: Callable[..., str], admin: str) -> None:
    everything = make_key("wide", sessions=["*"], rights=["read", "write"])
    job = gw.app.state.gateway.client.submit("qa", {"question": "from python"}, session="team-a-1")
    job.get(timeout=30)
    with gw.client(everything) as c:
        not_found(c.get(f"/v1/jobs/{job.id}"), "job_not_found")
    with gw.client(admin) as c:
        view = c.get(f"/v1/jobs/{job.id}").json()
        assert view["state"] == "SUCCESS" and view["result"]["session"] == "team-a-1"


def test_an_admin_key_can_do_everything(gw: Served, make_key: Callable[..., str], admin: str) -> None:
    team_b = make_key("team-b-2", sessions=["team-b*"])
    with gw.client(team_b) as b:
        job = submit(b, "team-b-2")
    with gw.client(admin) as root:
        assert root.get(f"/v1/jobs/{job}").status_code == 200
        assert root.get(f"/v1/jobs/{job}/events").status_code == 200
        base = "/v1/sessions/team-b-2/programs/qa"
        assert root.put(base, json={"state": {"demos": []}}).status_code == 200
        assert root.post(base + "/rollback", json={"version": 1}).status_code == 200
        assert root.delete(base).status_code == 204
        root.put(base, json={"state": {"demos": []}})
        assert root.delete("/v1/sessions/team-b-2").status_code == 204
        assert submit(root) and submit(root, "anything")


def test_optimization_runs_are_scoped_by_session(gw: Served, make_key: Callable[..., str], admin: str,
                                                 redis_module: Any) -> None:
    runs = RunStore(redis=redis_module, namespace=gw.settings.namespace)
    spec = {"signature": "qa", "program": "qa", "optimizer": "bootstrap_few_shot", "metric": "exact_match"}
    run_b = runs.create({**spec, "session": "team-b-9"})
    run_none = runs.create(spec)  # a dry run started outside the gateway
    team_a = make_key("opt-a", sessions=["team-a*"])
    team_b = make_key("opt-b", sessions=["team-b*"])
    with gw.client(team_a) as a:
        for path in ("", "/candidate", "/events"):
            not_found(a.get(f"/v1/optimizations/{run_b}{path}"), "run_not_found")
            not_found(a.get(f"/v1/optimizations/{run_none}{path}"), "run_not_found")
        not_found(a.post(f"/v1/optimizations/{run_b}/cancel"), "run_not_found")
        forbidden(a.get("/v1/optimizations", params={"session": "team-b-9"}), session="team-b-9")
        assert run_b not in a.get("/v1/optimizations").json()["items"]
        forbidden(a.post("/v1/optimizations", json={"signature": "qa", "trainset": ROWS, "session": "team-b-9"}),
                  session="team-b-9")
        forbidden(a.post("/v1/optimizations", json={"signature": "qa", "trainset": ROWS}), session="@default")
        forbidden(a.post("/v1/optimizations", json={"signature": "qa", "dataset": "team-b-data",
                                                    "session": "team-a-9"}), dataset="team-b-data")
    with gw.client(team_b) as b:
        assert b.get(f"/v1/optimizations/{run_b}").json()["session"] == "team-b-9"
        assert run_b in b.get("/v1/optimizations").json()["items"]
        assert run_b in b.get("/v1/optimizations", params={"session": "team-b-9"}).json()["items"]
        assert b.post(f"/v1/optimizations/{run_b}/cancel").status_code == 202
        not_found(b.get(f"/v1/optimizations/{run_none}"), "run_not_found")
    with gw.client(admin) as root:
        assert root.get(f"/v1/optimizations/{run_none}").status_code == 200
        assert {run_b, run_none} <= set(root.get("/v1/optimizations").json()["items"])


def test_a_dry_run_belongs_to_the_key_that_started_it(gw: Served, make_key: Callable[..., str]) -> None:
    mine, theirs = make_key("dry-1"), make_key("dry-2")  # both: the default program only
    with gw.client(mine) as c:
        r = c.post("/v1/optimizations", json={"signature": "qa", "trainset": ROWS})
        assert r.status_code == 202, r.text
        run_id = r.json()["run_id"]
        assert c.get(f"/v1/optimizations/{run_id}").status_code == 200
        assert run_id in c.get("/v1/optimizations").json()["items"]
    with gw.client(theirs) as c:
        not_found(c.get(f"/v1/optimizations/{run_id}"), "run_not_found")
        not_found(c.post(f"/v1/optimizations/{run_id}/cancel"), "run_not_found")
        assert run_id not in c.get("/v1/optimizations").json()["items"]
    with gw.client(mine) as c:
        assert c.post(f"/v1/optimizations/{run_id}/cancel").status_code == 202


def test_a_legacy_key_keeps_full_access_is_marked_and_warned_about(gw: Served, redis_module: Any,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from fastapi.testclient import TestClient

    from dspex_tasks.client import Client
    from dspex_tasks.gateway import create_gateway
    from dspex_tasks.gateway.auth import hash_key

    # Given a key stored before scopes existed (no rights, no sessions in its record)
    raw = "dsk_0123abcd_" + "L" * 43
    record = {"id": "0123abcd", "name": "old-svc", "created_at": time.time(), "rate_per_min": None}
    redis_module.hset(keys.gateway_api_keys(gw.settings.namespace), hash_key(raw), json.dumps(record))
    job = gw.app.state.gateway.client.submit("qa", {"question": "outside"}, session="team-z")
    job.get(timeout=30)
    # a gateway starting warns about it once
    with caplog.at_level("WARNING", logger="dspex_tasks.gateway"), Client(settings=gw.settings) as client, \
            TestClient(create_gateway(gw.settings, client=client)) as c:
        assert c.get("/healthz").status_code == 200
    warnings = [r.getMessage() for r in caplog.records if "legacy" in r.getMessage()]
    assert len(warnings) == 1 and "0123abcd" in warnings[0], caplog.text
    # it keeps every right it had: any session, any job, deleting a session
    with gw.client(raw) as c:
        assert c.put("/v1/sessions/team-z/programs/qa", json={"state": {"demos": []}}).status_code == 200
        assert c.get(f"/v1/jobs/{job.id}").status_code == 200
        assert c.delete("/v1/sessions/team-z").status_code == 204
    # and the listing marks it
    listed = {k.id: k for k in KeyStore(redis=redis_module, namespace=gw.settings.namespace).list()}
    assert listed["0123abcd"].legacy and listed["0123abcd"].to_json()["legacy"] is True
    assert listed["0123abcd"].to_json()["rights"] == ["admin"]


def test_the_cli_creates_scoped_keys_lists_scopes_and_grants(gw: Served, redis_module: Any) -> None:
    from dspex_tasks.gateway.auth import hash_key

    env = worker_env(gw.settings.redis_url, gw.settings.namespace, COLUMNS="200")
    old = {"id": "0badc0de", "name": "older-svc", "created_at": time.time()}  # stored before scopes
    redis_module.hset(keys.gateway_api_keys(gw.settings.namespace), hash_key("dsk_0badc0de_" + "x" * 43),
                      json.dumps(old))

    def dspex(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dspex_tasks", "keys", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    made = dspex("create", "--name", "cli-team", "--sessions", "team-c*,team-d", "--rights", "read")
    assert made.returncode == 0, made.stderr
    raw = made.stdout.strip()
    assert raw.startswith("dsk_") and "team-c*" in made.stderr and "read" in made.stderr
    listed = {k["name"]: k for k in json.loads(dspex("ls", "--json").stdout)}
    assert listed["cli-team"]["sessions"] == ["team-c*", "team-d"] and listed["cli-team"]["rights"] == ["read"]
    assert listed["cli-team"]["legacy"] is False
    table = dspex("ls").stdout
    assert "team-c*" in table and "legacy" in next(line for line in table.splitlines() if "0badc0de" in line)
    with gw.client(raw) as c:
        forbidden(c.post("/v1/signatures/qa/jobs", json={"inputs": {"question": "q"}, "session": "team-d"}),
                  right="write")
    assert dspex("grant", "cli-team", "--rights", "write").returncode == 0
    with gw.client(raw) as c:
        submit(c, "team-d")
    bad = dspex("create", "--name", "bad", "--rights", "root")
    assert bad.returncode == 2 and "read, write, admin" in bad.stderr
    bad = dspex("create", "--name", "bad", "--sessions", "team*a")
    assert bad.returncode == 2 and "team*a" in bad.stderr


# -- every route ------------------------------------------------------------------------------------------------
_SAMPLE = {"name": "qa", "job_id": "no-such-job", "run_id": "0" * 32, "session": "s1", "program": "qa"}
_LACKING = {"read": {"rights": ["write"], "sessions": ["*"]},
            "write": {"rights": ["read"], "sessions": ["*"]},
            "admin": {"rights": ["read", "write"], "sessions": ["*"]}}


def test_every_route_declares_a_right_and_a_key_without_it_is_refused(gw: Served, make_key: Callable[..., str]
                                                                       ) -> None:
    from dspex_tasks.gateway.middleware import PUBLIC_PATHS
    from dspex_tasks.gateway.routers.access import route_rights

    rights = route_rights(gw.app)
    assert len(rights) >= 20 and set(rights.values()) == {"read", "write", "admin"}
    assert all(path not in PUBLIC_PATHS for _method, path in rights)
    lacking = {right: make_key(f"lacks-{right}", **scopes) for right, scopes in _LACKING.items()}
    for (method, path), right in sorted(rights.items()):
        url = path.format(**{k: v for k, v in _SAMPLE.items() if "{" + k + "}" in path})
        assert "{" not in url, f"add a sample value for {path} to _SAMPLE"
        with gw.client(lacking[right]) as c:
            r = c.request(method, url, json={"inputs": {"question": "q"}} if method in ("POST", "PUT") else None)
        forbidden(r, right=right)
    # the OpenAPI document says which right each operation needs, and what a 403 means
    with gw.client() as anon:
        doc = anon.get("/openapi.json").json()
    op = doc["paths"]["/v1/sessions/{session}"]["delete"]
    assert op["x-dspex-right"] == "admin" and "admin" in op["responses"]["403"]["description"]
    assert doc["paths"]["/v1/signatures/qa/jobs"]["post"]["x-dspex-right"] == "write"
    assert doc["paths"]["/v1/jobs/{job_id}"]["get"]["x-dspex-right"] == "read"


def test_a_route_without_a_right_stops_the_gateway(gw: Served) -> None:
    from fastapi.testclient import TestClient

    from dspex_tasks.client import Client
    from dspex_tasks.errors import ConfigurationError
    from dspex_tasks.gateway import create_gateway
    from dspex_tasks.gateway.routers.access import check_routes

    with Client(settings=gw.settings) as client:
        app = create_gateway(gw.settings, client=client)
        app.add_api_route("/v1/forgotten", lambda: {"secret": 1}, methods=["GET"])
        with pytest.raises(ConfigurationError, match="/v1/forgotten"):
            check_routes(app)
        with pytest.raises(ConfigurationError, match="/v1/forgotten"), TestClient(app):
            pass  # the lifespan refuses to serve it
