"""Layer 3: the gateway's web console (/console) in a real headless Chromium, over a real worker process (predict
and optimize queues), the HTTP mock LM and a real Redis.

The browser is the system Chromium (``/usr/bin/chromium``, or ``DSPEX_TEST_CHROMIUM``) driven by the Python
``playwright`` package, as in test_flower.py; a missing Chromium fails the test. Every page is checked for
console errors and uncaught exceptions at 1280 and 390 px wide, and screenshotted into the test's tmp dir; with
``DSPEX_TEST_CONSOLE_SCREENSHOTS=1`` the screenshots are also copied to ``docs/console/`` (the README shows them).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from dspex_tasks.client import Client
from dspex_tasks.gateway import create_gateway
from dspex_tasks.gateway.auth import KeyStore
from dspex_tasks.gateway.console.auth import COOKIE, CookieSigner, Login
from dspex_tasks.settings import Settings
from dspex_tasks.testing.mock_server import MockLMServer
from dspex_tasks.testing.mockgen import rule_answer
from tests._procs import ROOT, WorkerProcess, wait_for
from tests.redis.test_gateway import UvicornThread

pytestmark = pytest.mark.system

CHROMIUM = os.environ.get("DSPEX_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SECRET = "console-test-secret-" + uuid.uuid4().hex
WIDTHS = (1280, 390)
DOCS = ROOT / "docs" / "console"
PAGES = ("/", "/programs", "/runs", "/jobs", "/usage", "/fleet")
# never in the way (a burst of 600), and its bucket outlives the last call by a minute: the fleet page shows it
LIMITS = {"openai/mock": {"rpm": 600, "burst": 600}}


def labelled(n: int) -> list[dict[str, Any]]:
    return [{"question": f"what is item {i}", "answer": rule_answer({"question": f"what is item {i}"})}
            for i in range(n)]


@dataclass
class Console:
    url: str  # the gateway's, without /console
    client: Client
    keys: KeyStore
    admin: str
    reader: str
    mock_lm: MockLMServer
    shots: dict[str, Path] = field(default_factory=dict)  # name -> screenshot

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=15, follow_redirects=False)


@pytest.fixture(scope="module")
def console(redis_base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    # Module-scoped on a namespace and queues of its own (the per-test redis_url fixture would flush them).
    ns = f"con{uuid.uuid4().hex[:8]}"
    queues = {"DSPEX_PREDICT_QUEUE": f"{ns}.predict", "DSPEX_OPTIMIZE_QUEUE": f"{ns}.optimize"}
    mock_lm = MockLMServer(port=0, latency_ms=0).start()
    mock_lm.control(scenario="learns_from_demos")
    env = {"DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": mock_lm.url, "DSPEX_LM_API_KEY": "sk-test-not-real",
           "DSPEX_LM_NUM_RETRIES": "0", "DSPEX_LM_TIMEOUT_S": "10", "DSPEX_STREAM_TTL_S": "300",
           "DSPEX_RATE_LIMITS": json.dumps(LIMITS), **queues}
    worker = WorkerProcess(redis_base_url, ns, queues=",".join(queues.values()), concurrency=16, env=env,
                           name=f"console-{ns}", log_dir=tmp_path_factory.mktemp("console-worker"))
    settings = Settings(redis_url=redis_base_url, namespace=ns, predict_queue=queues["DSPEX_PREDICT_QUEUE"],
                        optimize_queue=queues["DSPEX_OPTIMIZE_QUEUE"], console_secret=SECRET,
                        gateway_rate_per_min=100_000, rate_limits=LIMITS)
    client = Client(settings=settings)
    gateway_client = Client(settings=settings)
    server = UvicornThread(create_gateway(settings, client=gateway_client))
    store = KeyStore(redis=client.redis, namespace=ns)
    admin, _ = store.create("console-admin", rights=["admin"])
    reader, _ = store.create("console-reader", rights=["read"], sessions=["cs*"])
    try:
        server.__enter__()
        worker.wait_ready(timeout_s=60)
        wait_for(lambda: "qa" in client.signatures(refresh=True), timeout_s=30, what="signatures published")
        yield Console(f"http://127.0.0.1:{server.port}", client, store, admin, reader, mock_lm)
    finally:
        server.__exit__()
        worker.stop(timeout_s=10)
        gateway_client.close()
        client.close()
        mock_lm.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    assert Path(CHROMIUM).is_file(), (f"{CHROMIUM} is missing: run scripts/ci-deps.sh (apt-get install chromium) "
                                      "or set DSPEX_TEST_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@dataclass
class Tab:
    page: Any
    errors: list[str]


@pytest.fixture
def open_tab(browser: Any, console: Console) -> Iterator[Callable[..., Tab]]:
    """A new browser context (its own cookies) and page, logged in with ``key`` unless None; console errors and
    page errors are collected."""
    contexts: list[Any] = []

    def make(key: str | None = "admin", width: int = 1280) -> Tab:
        context = browser.new_context(viewport={"width": width, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        errors: list[str] = []
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
        if key is not None:
            raw = {"admin": console.admin, "reader": console.reader}.get(key, key)
            page.goto(f"{console.url}/console/login")
            page.fill("#key", raw)
            page.click("button[type=submit]")
            page.wait_for_url(f"{console.url}/console/")
        return Tab(page, errors)

    yield make
    for context in contexts:
        context.close()


def unexpected(errors: list[str], *statuses: int) -> list[str]:
    """The errors but Chromium's report of a page answered with one of ``statuses`` (a refusal the test expects)."""
    return [e for e in errors if not any(f"status of {s} " in e for s in statuses)]


def _signed(login: Login, secret: str = SECRET) -> str:
    from dspex_tasks.gateway.console.auth import console_secret

    key, _ = console_secret(Settings(console_secret=secret))
    return CookieSigner(key).sign(login)


def _login_for(console: Console, name: str) -> Login:
    record = next(k for k in console.keys.list() if k.name == name)
    return Login(record.id, record.created_at, tuple(record.rights or ()), int(time.time()) + 600)


def test_every_page_without_a_login_redirects_to_the_login_page(console: Console, open_tab: Callable[..., Tab]
                                                                ) -> None:
    with console.http() as http:
        for path in (*PAGES, "/runs/" + "0" * 32, "/programs/cs/qa", "/jobs/" + "0" * 32, "/fleet/status"):
            r = http.get("/console" + path)
            assert r.status_code == 303, (path, r.status_code)
            assert r.headers["location"].startswith("/console/login?next=%2Fconsole"), r.headers["location"]
        r = http.post("/console/programs/cs/qa/rollback", data={"version": "1"})
        assert r.status_code == 303 and r.headers["location"] == "/console/login"
        assert http.get("/console/login").status_code == 200
        assert http.get("/console/static/console.js").status_code == 200
    tab = open_tab(None)
    tab.page.goto(f"{console.url}/console/runs")
    assert tab.page.url == f"{console.url}/console/login?next=%2Fconsole%2Fruns"
    assert tab.page.locator("#key").is_visible()
    assert tab.errors == []


def test_a_forged_tampered_expired_or_revoked_cookie_is_refused(console: Console, open_tab: Callable[..., Tab]
                                                               ) -> None:
    reader = _login_for(console, "console-reader")
    good = _signed(reader)
    version, payload, mac = good.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    raised = base64.urlsafe_b64encode(json.dumps({**data, "r": ["admin"]}).encode()).rstrip(b"=").decode()
    temp, _ = console.keys.create("console-temp", rights=["read"])
    revoked = _signed(_login_for(console, "console-temp"))
    console.keys.revoke("console-temp")
    bad = {
        "forged (another secret)": _signed(reader, secret="not-the-console-secret-at-all"),
        "tampered (rights raised, old mac)": f"{version}.{raised}.{mac}",
        "tampered mac": f"{version}.{payload}.{mac[:-2]}AA",
        "expired": _signed(Login(reader.key_id, reader.created_at, reader.rights, int(time.time()) - 1)),
        "revoked key": revoked,
        "garbage": "v1.e30.x",
    }
    with console.http() as http:
        assert http.get("/console/runs", cookies={COOKIE: good}).status_code == 200  # the genuine one works
        for what, value in bad.items():
            r = http.get("/console/runs", cookies={COOKIE: value})
            assert r.status_code == 303 and r.headers["location"].startswith("/console/login"), what
            assert f'{COOKIE}=""' in r.headers.get("set-cookie", ""), what  # the bad cookie is cleared
    tab = open_tab(None)
    tab.page.context.add_cookies([{"name": COOKIE, "value": bad["forged (another secret)"], "url": console.url}])
    tab.page.goto(f"{console.url}/console/programs")
    assert tab.page.url.startswith(f"{console.url}/console/login")


def test_log_in_with_a_key_then_log_out(console: Console, open_tab: Callable[..., Tab]) -> None:
    tab = open_tab(None)
    page = tab.page
    page.goto(f"{console.url}/console/login?next=%2Fconsole%2Ffleet")
    page.fill("#key", "dsk_00000000_" + "x" * 43)  # well-formed, unknown
    page.click("button[type=submit]")
    assert "Unknown or revoked API key" in page.locator("p.error").inner_text()
    assert unexpected(tab.errors, 401) == []  # the refused login is answered 401; Chromium reports it
    tab.errors.clear()
    page.fill("#key", console.reader)
    page.click("button[type=submit]")
    page.wait_for_url(f"{console.url}/console/fleet")  # back where the login was asked for
    cookie = next(c for c in page.context.cookies() if c["name"] == COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["path"] == "/console"
    assert console.reader not in cookie["value"] and console.reader.split("_", 2)[2] not in cookie["value"]
    header = page.locator(".who").inner_text()
    assert _login_for(console, "console-reader").key_id in header and "read" in header
    page.click("a.logout")
    page.wait_for_url(f"{console.url}/console/login")
    page.goto(f"{console.url}/console/")
    assert page.url.startswith(f"{console.url}/console/login")
    assert tab.errors == []


def test_the_run_chart_grows_while_an_optimization_runs(console: Console, open_tab: Callable[..., Tab]) -> None:
    # Given an optimization run slowed by the LM (so the page opens while it runs)
    console.mock_lm.control(latency_ms=40)
    try:
        run = console.client.optimize("qa", labelled(20), session="cs-run", params={"eval_chunk_size": 2})
        tab = open_tab("admin")
        page = tab.page
        # When its page is open
        page.goto(f"{console.url}/console/runs/{run.id}")
        canvas = page.locator("#run-chart")
        seen = [int(canvas.get_attribute("data-points") or 0)]
        deadline = time.monotonic() + 60
        while canvas.get_attribute("data-ended") != "true" and time.monotonic() < deadline:
            seen.append(int(canvas.get_attribute("data-points") or 0))
            time.sleep(0.05)
        seen.append(int(canvas.get_attribute("data-points") or 0))
    finally:
        console.mock_lm.control(latency_ms=0)
    # Then the chart took points from the live event stream, several times, up to the run's end
    events = list(console.client.run(run.id).events(timeout=10))
    grew = sorted(set(seen))
    assert len(grew) >= 3 and seen[-1] == len(events), (grew, len(events))
    assert seen[0] < seen[-1], seen
    assert int(canvas.get_attribute("data-scores") or 0) >= 2  # baseline and candidate (and the final score)
    page.wait_for_selector("#decision.promoted")
    assert "Promoted" in page.locator("#decision").inner_text()
    assert page.locator("#run-status").inner_text() == "succeeded"
    assert page.locator("#run-events tr").count() == len(events)
    assert page.locator("#baseline-score").inner_text() == "0.000"
    assert page.locator("#candidate-score").inner_text() == "1.000"
    assert tab.errors == []
    # and the run list shows it, filtered by status
    page.goto(f"{console.url}/console/runs?status=succeeded")
    assert page.locator(f"tr[data-run='{run.id}']").count() == 1
    page.goto(f"{console.url}/console/runs?status=failed")
    assert page.locator(f"tr[data-run='{run.id}']").count() == 0


def test_a_streaming_job_is_followed_to_its_result(console: Console, open_tab: Callable[..., Tab]) -> None:
    console.mock_lm.control(chunk_latency_ms=15)
    try:
        tab = open_tab("admin")
        page = tab.page
        page.goto(f"{console.url}/console/jobs?signature=qa")
        question = f"What do the console's chunks spell ({uuid.uuid4().hex[:6]})?"
        page.fill("#in-question", question)
        page.fill("input[name=session]", "cs-jobs")
        page.click("#submit-job")
        page.wait_for_url(f"{console.url}/console/jobs/*")
        page.wait_for_selector("#job-live[data-done=result]", timeout=30_000)
    finally:
        console.mock_lm.control(chunk_latency_ms=0)
    job_id = page.url.rsplit("/", 1)[1]
    result = console.client.job(job_id).get(timeout=10)
    assert int(page.locator("#job-live").get_attribute("data-tokens") or 0) > 1  # streamed, not one settled chunk
    assert page.locator("pre.stream[data-field=answer]").inner_text() == result.outputs["answer"]
    assert page.locator("#job-state").inner_text() == "SUCCESS"
    assert page.locator("#job-version").inner_text() == str(result.program_version)
    assert int(page.locator("#job-live").get_attribute("data-steps") or 0) >= 2  # the module's start and end
    assert result.outputs["answer"] in page.locator("#job-outputs").inner_text()
    # the trace: each predictor call with its inputs and outputs, as the stored result has it
    assert result.trace and page.locator("#job-trace > li").count() == len(result.trace)
    first = page.locator("#job-trace > li").first.inner_text()
    assert result.trace[0]["predictor"] in first and result.outputs["answer"] in first
    assert tab.errors == []
    # A form error names the field and keeps the input; nothing is submitted
    page.goto(f"{console.url}/console/jobs?signature=qa")
    page.fill("input[name=session]", "bad session!")
    page.fill("#in-question", "kept")
    page.click("#submit-job")
    assert page.locator("#in-question").input_value() == "kept"
    assert page.locator(".error").count() >= 1


def test_diff_two_versions_then_roll_back(console: Console, open_tab: Callable[..., Tab]) -> None:
    store = console.client.programs
    demo = {"question": "what is item 1", "answer": rule_answer({"question": "what is item 1"})}
    extra = {"question": "what is item 2", "answer": rule_answer({"question": "what is item 2"})}
    store.put("cs-prog", "qa", {"demos": [demo], "instructions": "Answer the question."}, signature="qa")
    store.put("cs-prog", "qa", {"demos": [demo, extra], "instructions": "Answer the question. Be brief."},
              signature="qa")
    # A read-only key sees the versions but has no rollback, and is refused one
    reader = open_tab("reader")
    reader.page.goto(f"{console.url}/console/programs/cs-prog/qa")
    assert reader.page.locator("text=Roll back to").count() == 0
    response = reader.page.goto(f"{console.url}/console/programs/cs-prog/qa/rollback?version=1")
    assert response is not None and response.status == 403 and "lacks the 'write' right" in reader.page.content()
    tab = open_tab("admin")
    page = tab.page
    page.goto(f"{console.url}/console/programs")
    page.click("a.chip[href$='/programs/cs-prog/qa']")
    page.wait_for_url(f"{console.url}/console/programs/cs-prog/qa")
    assert page.locator("#current-version").inner_text() == "2"
    # The default diff: the version before the current one, against the current one
    diff = page.locator("#diff .predictor-diff")
    assert diff.count() == 1 and "instructions changed" in diff.inner_text() and "demos changed" in diff.inner_text()
    assert page.locator("#diff .instructions .added").inner_text() == "Be brief."
    assert page.locator("#diff table.demos tr.added").count() == 1
    assert page.locator("#diff table.demos tr.equal").count() == 1
    # Roll back: a confirmation page first, showing what changes, then the post
    page.click("a:has-text('Roll back to v1')")
    page.wait_for_url("**/rollback?version=1")
    assert "Roll back qa to v1?" in page.locator("h1").inner_text()
    assert page.locator(".instructions .removed").inner_text() == "Be brief."
    assert store.current_version("cs-prog", "qa") == 2  # nothing happened yet
    page.click("#confirm-rollback")
    page.wait_for_url("**/programs/cs-prog/qa?done=*")
    assert "rolled back to version 1" in page.locator(".flash").inner_text()
    assert page.locator("#current-version").inner_text() == "1"
    assert store.current_version("cs-prog", "qa") == 1 and store.history("cs-prog", "qa") == [1, 2]
    assert tab.errors == []
    assert unexpected(reader.errors, 403) == []  # the refused rollback page's own 403, nothing else


def test_every_page_renders_without_errors_at_1280_and_390_px(console: Console, open_tab: Callable[..., Tab],
                                                               tmp_path: Path) -> None:
    # Given two program versions, a finished run, a finished job of the admin key (submitted through the API)
    # and usage to chart
    if len(console.client.programs.history("cs-prog", "qa")) < 2:  # this test alone
        for instructions in ("Answer.", "Answer briefly."):
            console.client.programs.put("cs-prog", "qa", {"demos": [], "instructions": instructions}, signature="qa")
    run_ids = console.client.runs.ids(limit=1)
    if not run_ids:  # this test alone: a quick run of its own
        run_ids = [console.client.optimize("qa", labelled(8), session="cs-run").id]
        console.client.run(run_ids[0]).get(timeout=60)
    with console.http() as http:
        r = http.post("/v1/signatures/qa/jobs", headers={"Authorization": f"Bearer {console.admin}"},
                      json={"inputs": {"question": "for the screenshots"}, "session": "cs-jobs", "stream": True, "trace": True})
        assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    console.client.job(job_id).get(timeout=30)
    from dspex_tasks.lm.usage import usage_report

    wait_for(lambda: usage_report(console.client.redis, console.client.settings.namespace), timeout_s=10,
             what="usage flushed")
    pages = {"overview": "/", "programs": "/programs", "program": "/programs/cs-prog/qa?a=1&b=2",
             "rollback": "/programs/cs-prog/qa/rollback?version=2", "runs": "/runs", "jobs": "/jobs?signature=qa",
             "run": f"/runs/{run_ids[0]}", "job": f"/jobs/{job_id}", "usage": "/usage", "fleet": "/fleet",
             "login": "/login"}  # last: it logs out
    overflow: list[str] = []
    for width in WIDTHS:
        tab = open_tab("admin", width=width)
        for name, path in pages.items():
            if name == "login":
                tab.page.context.clear_cookies()
            response = tab.page.goto(f"{console.url}/console{path}")
            assert response is not None and response.status == 200, (name, response and response.status)
            assert tab.page.url.startswith(f"{console.url}/console{path.split('?')[0]}"), (name, tab.page.url)
            ready = {"fleet": "#fleet table.workers", "job": "#job-live[data-done]", "usage": "#usage-time-chart[data-ready]",
                     "run": "#run-chart[data-points]"}.get(name)
            if ready:
                tab.page.wait_for_selector(ready)
            tab.page.wait_for_timeout(150)  # charts draw on the next frame
            if tab.page.evaluate("document.documentElement.scrollWidth > window.innerWidth + 1"):
                overflow.append(f"{name}@{width}")
            shot = tmp_path / f"{name}-{width}.png"
            tab.page.screenshot(path=str(shot), full_page=True)
            console.shots[f"{name}-{width}"] = shot
        assert tab.errors == [], (width, tab.errors)
    assert overflow == [], f"pages wider than the viewport: {overflow}"
    # the usage page charts this hour's tokens per model, and the table's total agrees with it
    usage = open_tab("admin").page
    usage.goto(f"{console.url}/console/usage?hours=168&by=model")
    usage.wait_for_selector("#usage-chart[data-ready]")
    over_time = json.loads(usage.locator("#usage-time-data").text_content() or "{}")
    assert len(over_time["labels"]) == 168 and over_time["datasets"], over_time
    charted = sum(sum(d["data"]) for d in over_time["datasets"])  # a fresh namespace: all of it in the window
    assert charted > 0 and "openai/mock" in [d["label"] for d in over_time["datasets"]]
    assert charted <= sum(r["total_tokens"] for r in usage_report(console.client.redis,
                                                                   console.client.settings.namespace))
    assert usage.goto(f"{console.url}/console/usage?hours=5").status == 422  # type: ignore[union-attr]
    assert "hours: expected one of 24, 168, 720" in usage.locator("main").inner_text()
    # the fleet page shows the worker, its queues and the LM rate-limit bucket the jobs used
    fleet = open_tab("admin").page
    fleet.goto(f"{console.url}/console/fleet")
    fleet.wait_for_selector("#fleet table.workers")
    assert "console-con" in fleet.locator("table.workers").inner_text()
    assert "model:openai/mock" in fleet.locator("table.buckets").inner_text()
    assert console.client.settings.predict_queue in fleet.locator("table.queues").inner_text()
    if os.environ.get("DSPEX_TEST_CONSOLE_SCREENSHOTS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        for name, shot in console.shots.items():
            shutil.copyfile(shot, DOCS / f"{name}.png")
