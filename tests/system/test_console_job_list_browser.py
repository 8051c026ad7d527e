"""Layer 3: the console's recent-jobs table in a real headless Chromium at 390 px: no sideways page scroll, and
htmx adds a job submitted meanwhile without a reload."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from dspex_tasks.gateway.auth import KeyStore
from tests.redis import test_gateway as shared
from tests.redis.test_gateway import Served
from tests.system.test_console import CHROMIUM, CHROMIUM_FLAGS

gw_settings, gw_worker, redis_module = shared.gw_settings, shared.gw_worker, shared.redis_module
_started, serve, gw, key_store = shared._started, shared.serve, shared.gw, shared.key_store

pytestmark = pytest.mark.system


def test_the_recent_jobs_table_fits_390_px_and_refreshes(gw: Served, key_store: KeyStore, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing (or set DSPEX_TEST_CHROMIUM)"
    raw, _ = key_store.create("browser-list", sessions=["bl*", "@default"])
    with gw.client(raw) as c:
        first = c.post("/v1/signatures/qa/jobs", json={"inputs": {"question": "first"}}).json()["id"]
    started = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_context(viewport={"width": 390, "height": 900}).new_page()
        page.set_default_timeout(10_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(f"{gw.url}/console/login")
        page.fill("#key", raw)
        page.click("button[type=submit]")
        page.wait_for_url(f"{gw.url}/console/")
        page.goto(f"{gw.url}/console/jobs")
        assert page.locator(f'#recent-jobs tr[data-job="{first}"] .status').count() == 1
        # When a job is submitted elsewhere, the table shows it within a refresh (every 3 s)
        with gw.client(raw) as c:
            second = c.post("/v1/signatures/qa/jobs", json={"inputs": {"question": "second"}}).json()["id"]
        page.wait_for_selector(f'#recent-jobs tr[data-job="{second}"]', timeout=8_000)
        page.wait_for_selector(f'#recent-jobs tr[data-job="{second}"] .status.success', timeout=8_000)
        # the page never scrolls sideways: the table scrolls inside its box
        width: Any = page.evaluate("document.scrollingElement.scrollWidth")
        assert width <= 390, width
        page.locator("#recent-jobs").scroll_into_view_if_needed()
        page.screenshot(path=str(tmp_path / "jobs-390.png"), full_page=True)
        browser.close()
    assert errors == []
    print(f"browser part: {time.monotonic() - started:.1f} s; screenshot {tmp_path / 'jobs-390.png'}")
