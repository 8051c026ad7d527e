"""Flower, as deployed with flower_config.py: a real worker, a real Flower process, its HTTP API and its UI in Chromium.

The browser is the system Chromium (``/usr/bin/chromium``, or ``DSPEX_TEST_CHROMIUM``) driven by the Python
``playwright`` package; Playwright's own browser download is not used. A missing Chromium fails the test (CI
installs it with ``scripts/ci-deps.sh``). The tasks page screenshot lands in the test's tmp dir and in
``test-output/flower-tasks.png``.

Flower serves ``/metrics`` and ``/healthcheck`` without authentication, even with ``basic_auth`` on (see
flower_config.py); every other page and all of ``/api/*`` answer 401 without credentials.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dspex_tasks.client import Client, Job
from dspex_tasks.optimize.stages import PLAN
from dspex_tasks.settings import Settings
from tests._procs import ROOT, WorkerProcess, wait_for, worker_env

pytestmark = pytest.mark.system

CHROMIUM = os.environ.get("DSPEX_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
USER = "flower-test"
QUESTIONS = ["Why is the sky blue?", "What is a Celery worker?", "How deep is the ocean?"]
#: flower_config.py's default tasks_columns, the order of the cells in a tasks-table row.
COLUMNS = ["name", "uuid", "state", "kwargs", "result", "received", "runtime", "worker"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Http:
    status: int
    body: bytes
    headers: dict[str, str]  # names in lower case

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Stack:
    """A worker, a Flower in front of it, and the predictions submitted before the tests ran."""

    url: str
    password: str
    client: Client
    worker: WorkerProcess
    flower: subprocess.Popen[bytes]
    flower_log: Path
    db: Path
    jobs: dict[str, str] = field(default_factory=dict)  # task id -> question
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # task id -> outputs

    def auth(self, password: str | None = None) -> dict[str, str]:
        token = base64.b64encode(f"{USER}:{password or self.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def request(self, path: str, *, method: str = "GET", body: Any = None, auth: bool = True,
                headers: dict[str, str] | None = None) -> Http:
        hdrs = dict(self.auth() if auth else {}, **(headers or {}))
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, headers=hdrs, method=method)
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                return Http(resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()})
        except urllib.error.HTTPError as exc:
            return Http(exc.code, exc.read(), {k.lower(): v for k, v in exc.headers.items()})

    def tasks(self, name: str) -> dict[str, dict[str, Any]]:
        resp = self.request(f"/api/tasks?taskname={name}")
        assert resp.status == 200, resp.body
        tasks: dict[str, dict[str, Any]] = resp.json()
        return tasks

    def log(self) -> str:
        return self.flower_log.read_text(errors="replace")


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.1)
    raise TimeoutError(f"flower not listening on {port} in {timeout_s}s:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # Flower saves its state (persistent) on the way out
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    return proc.returncode


@pytest.fixture(scope="module")
def stack(redis_base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Module-scoped, on a namespace and queues of its own (the per-test redis_url fixture would flush them).
    ns = f"fl{uuid.uuid4().hex[:8]}"
    queues = {"DSPEX_PREDICT_QUEUE": f"{ns}.predict", "DSPEX_OPTIMIZE_QUEUE": f"{ns}.optimize"}
    tmp = tmp_path_factory.mktemp("flower")
    password = f"pw-{uuid.uuid4().hex[:12]}"
    worker = WorkerProcess(redis_base_url, ns, queues=",".join(queues.values()), concurrency=8,
                           name=f"flowertest-{ns}", log_dir=tmp, env=queues)
    port = _free_port()
    log = tmp / "flower.log"
    db = tmp / "state" / "flower.db"
    env = worker_env(redis_base_url, ns, FLOWER_BASIC_AUTH=f"{USER}:{password}", DSPEX_FLOWER_DB=str(db), **queues)
    with open(log, "wb") as out:
        flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.app", "flower",
                                   "--conf=flower_config.py", f"--port={port}"], cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    client = Client(settings=Settings(redis_url=redis_base_url, namespace=ns, predict_queue=queues["DSPEX_PREDICT_QUEUE"],
                                      optimize_queue=queues["DSPEX_OPTIMIZE_QUEUE"]))
    st = Stack(f"http://127.0.0.1:{port}", password, client, worker, flower, log, db)
    try:
        _wait_for_port(port, flower, log)
        worker.wait_ready(timeout_s=60)
        wait_for(lambda: "qa" in client.signatures(refresh=True), timeout_s=30, what="signatures published")
        for question in QUESTIONS:
            job = client.submit("qa", {"question": question}, session="s1")
            st.jobs[job.id] = question
        for job_id in st.jobs:
            st.results[job_id] = client.job(job_id).get(timeout=30).outputs
        yield st
    finally:
        code = _stop(flower)
        worker.stop(timeout_s=10)
        client.close()
        print(f"flower exited {code}; log tail:\n{log.read_text(errors='replace')[-1500:]}")


def test_flower_refuses_requests_without_credentials(stack: Stack) -> None:
    for path in ("/api/tasks", "/api/workers", "/api/task/types", "/api/queues/length", "/tasks", "/", "/workers"):
        resp = stack.request(path, auth=False)
        assert resp.status == 401, (path, resp.status)
        assert stack.request(path, auth=False, headers=stack.auth("wrong")).status == 401, path
    assert stack.request("/tasks", auth=False).headers.get("www-authenticate") == 'Basic realm="flower"'
    assert stack.request("/api/workers").status == 200


def test_unauthenticated_task_submission_is_refused_and_runs_nothing(stack: Stack) -> None:
    refused = f"refused-{uuid.uuid4().hex[:8]}"
    body = {"kwargs": {"inputs": {"question": refused}, "session": "s1", "program": None}}
    for headers in ({}, stack.auth("wrong")):
        for path in ("/api/task/async-apply/dspex.qa", "/api/task/apply/dspex.qa", "/api/task/send-task/dspex.qa"):
            resp = stack.request(path, method="POST", body=body, auth=False, headers=headers)
            assert resp.status == 401, (path, resp.status, resp.body)
    # The same request with credentials is accepted and runs (so the 401s above are what stopped it)
    accepted = f"accepted-{uuid.uuid4().hex[:8]}"
    resp = stack.request("/api/task/async-apply/dspex.qa", method="POST",
                         body={"kwargs": {"inputs": {"question": accepted}, "session": "s1", "program": None}})
    assert resp.status == 200, resp.body
    task_id = resp.json()["task-id"]
    assert Job(stack.client.app.AsyncResult(task_id)).get(timeout=30).outputs["answer"]
    seen = wait_for(lambda: (tasks := stack.tasks("dspex.qa")).get(task_id, {}).get("state") == "SUCCESS" and tasks,
                    timeout_s=15, what="the accepted task in Flower")
    assert not [t for t in seen.values() if refused in (t.get("kwargs") or "")]
    from dspex_tasks.observability.status import queue_depth

    assert queue_depth(stack.client.redis, stack.client.settings.predict_queue) == 0


def test_api_lists_dspex_tasks_with_readable_kwargs_and_results(stack: Stack) -> None:
    tasks = wait_for(lambda: (t := stack.tasks("dspex.qa")) and all(
        t.get(i, {}).get("state") == "SUCCESS" and t[i].get("result") for i in stack.jobs) and t,
        timeout_s=15, what="every submitted task SUCCESS in Flower")
    for task_id, question in stack.jobs.items():
        task = tasks[task_id]
        assert task["name"] == "dspex.qa" and task["state"] == "SUCCESS" and task["worker"] == stack.worker.hostname
        assert task["args"] == "()"
        assert f"'inputs': {{'question': {question!r}}}" in task["kwargs"] and "'session': 's1'" in task["kwargs"]
        assert repr(stack.results[task_id]["answer"]) in task["result"]
    info = stack.request(f"/api/task/info/{next(iter(stack.jobs))}").json()
    assert info["state"] == "SUCCESS" and info["routing_key"] == stack.client.settings.predict_queue


def test_metrics_are_prometheus_text_without_authentication(stack: Stack) -> None:
    wait_for(lambda: all(t.get("state") == "SUCCESS" for t in stack.tasks("dspex.qa").values()), timeout_s=15,
             what="events in Flower")
    resp = stack.request("/metrics", auth=False)
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.body.decode()
    assert "# TYPE flower_events_total counter" in text
    worker = stack.worker.hostname
    assert f'flower_events_total{{task="dspex.qa",type="task-succeeded",worker="{worker}"}}' in text
    # flower_config.py's runtime buckets, sized for LM calls
    assert f'flower_task_runtime_seconds_bucket{{le="600.0",task="dspex.qa",worker="{worker}"}}' in text
    assert stack.request("/healthcheck", auth=False).body == b"OK"


def test_tasks_page_in_chromium(stack: Stack, tmp_path: Path) -> None:
    assert Path(CHROMIUM).is_file(), (f"{CHROMIUM} is missing: run scripts/ci-deps.sh (apt-get install chromium) "
                                      "or set DSPEX_TEST_CHROMIUM")
    from playwright.sync_api import sync_playwright

    ids = list(stack.jobs)
    shot = tmp_path / "flower-tasks.png"
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            http_credentials={"username": USER, "password": stack.password}, viewport={"width": 1600, "height": 900})
        try:
            page = context.new_page()
            response = page.goto(f"{stack.url}/tasks", wait_until="domcontentloaded")
            assert response is not None and response.status == 200
            # Rows arrive by XHR (DataTables, one row per task, row id = task id)
            page.wait_for_function(
                """ids => ids.every(id => {
                       const row = document.getElementById(id);
                       return row && row.closest('#tasks-table') && row.innerText.includes('SUCCESS');
                   })""", arg=ids, timeout=20_000)
            rows = page.eval_on_selector_all(
                "#tasks-table tbody tr", "rows => rows.map(r => [r.id, [...r.cells].map(c => c.textContent.trim())])")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            context.close()
    out = ROOT / "test-output"
    out.mkdir(exist_ok=True)
    shutil.copyfile(shot, out / "flower-tasks.png")
    table = {row_id: dict(zip(COLUMNS, cells, strict=False)) for row_id, cells in rows}
    for task_id, question in stack.jobs.items():
        row = table[task_id]
        assert row["name"] == "dspex.qa" and row["state"] == "SUCCESS" and row["uuid"].startswith(task_id)
        assert question in row["kwargs"] and stack.results[task_id]["answer"] in row["result"]
        assert row["worker"] == stack.worker.hostname
    assert shot.stat().st_size > 10_000


def test_optimization_stages_show_in_flower_with_progress_meta(stack: Stack) -> None:
    """Stage tasks of an optimization run are listed by Flower under their stage's name; their state goes
    PROGRESS -> SUCCESS, a progress line shows in the Result column while they run, and their result says
    what the stage did.

    Stages mirror each progress event into the result backend (``update_state("PROGRESS", meta)``) and send a
    ``task-progress`` event whose ``result`` is a readable line (Flower's list follows events).
    """
    trainset = [{"question": f"what is item {i}", "answer": f"item {i}"} for i in range(8)]
    run = stack.client.optimize("qa", trainset, session="opt", params={"eval_chunk_size": 4})
    states: dict[str, set[str]] = {}
    progress: list[dict[str, Any]] = []
    lines: set[str] = set()

    def stage_tasks() -> dict[str, dict[str, Any]]:
        return {k: v for name in PLAN for k, v in stack.tasks(f"dspex.optimize.{name}").items()}

    deadline = time.monotonic() + 60
    while run.status()["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        listed = stage_tasks()
        lines.update(str(t.get("result")) for t in listed.values() if t.get("state") == "PROGRESS")
        for task_id in listed:
            state = stack.request(f"/api/task/result/{task_id}").json()["state"]
            states.setdefault(task_id, set()).add(state)
            if state == "PROGRESS":
                # one read, state and meta together: two reads race the stage finishing in between
                meta = stack.client.app.backend.get_task_meta(task_id, cache=False)
                if meta.get("status") == "PROGRESS" and isinstance(meta.get("result"), dict):
                    progress.append(meta["result"])
        time.sleep(0.02)
    summary = run.get(timeout=30)
    assert {"baseline_score", "score", "promoted"} <= set(summary)
    stages = wait_for(lambda: (t := stage_tasks()) and len(t) >= 5 and all(
        s["state"] == "SUCCESS" for s in t.values()) and t, timeout_s=15, what="stage tasks SUCCESS in Flower")
    assert {t["name"] for t in stages.values()} == {f"dspex.optimize.{name}" for name in PLAN}
    assert all(f"'run_id': '{run.id}'" in s["kwargs"] for s in stages.values())
    for task_id, task in stages.items():
        res = stack.request(f"/api/task/result/{task_id}").json()
        assert res["state"] == "SUCCESS" and res["result"]["stage"] == task["name"].rsplit(".", 1)[1], res
        assert task["kwargs"].startswith(f"{{'stage': '{res['result']['stage']}'") and "lm_calls" in res["result"]
    # a stage may finish between two polls; the progress lines themselves are checked from the events in
    # tests/redis/test_optimize_flower.py, here only that whatever Flower showed while running reads as one
    assert all(line.startswith(tuple(PLAN)) for line in lines), lines
    seen = set().union(*states.values()) if states else set()
    assert seen <= {"PENDING", "STARTED", "PROGRESS", "SUCCESS"}, seen
    for meta in progress:
        assert meta["run_id"] == run.id and {"stage", "done", "total"} <= set(meta), meta
    print(f"stage result states seen through Flower: {sorted(seen)}; {len(progress)} PROGRESS metas, e.g. "
          f"{progress[:1]}; progress lines: {sorted(lines)[:3]}")


def test_state_persists_across_a_restart(stack: Stack) -> None:
    """Last: stop Flower (SIGTERM saves its state) and check the shelve file holds the tasks."""
    assert _stop(stack.flower) == 0, stack.log()[-2000:]
    files = [p for p in stack.db.parent.iterdir() if p.name.startswith(stack.db.name)]
    assert files, f"no state file next to {stack.db}"
    import shelve

    with shelve.open(str(stack.db), flag="r") as state:
        events = state["events"]
    saved = set(events.tasks)
    assert set(stack.jobs) <= saved


def test_dspex_flower_command(redis_base_url: str, tmp_path: Path) -> None:
    """``dspex flower`` execs Flower with flower_config.py: options pass through, SIGTERM stops it cleanly."""
    port = _free_port()
    env = worker_env(redis_base_url, f"fc{uuid.uuid4().hex[:6]}", FLOWER_BASIC_AUTH=f"{USER}:pw",
                     DSPEX_FLOWER_DB=str(tmp_path / "flower.db"))
    log = tmp_path / "dspex-flower.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dspex_tasks", "flower", "--port", str(port), "--",
                                 "--url_prefix=ops"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_port(port, proc, log)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ops/healthcheck", timeout=10) as resp:
            assert resp.read() == b"OK"
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ops/api/workers", timeout=10)
        assert denied.value.code == 401
    finally:
        code = _stop(proc)
    text = log.read_text(errors="replace")
    assert code == 0, text[-2000:]  # the exec'd Flower got the signal itself
    assert "flower_config.py" in text and f"--port={port}" in text
    # Without credentials off loopback it refuses to start, naming the fix
    env.pop("FLOWER_BASIC_AUTH")
    refused = subprocess.run([sys.executable, "-m", "dspex_tasks", "flower", "--address", "0.0.0.0", "--port", "0"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 1 and "refusing to start Flower without authentication" in refused.stderr
