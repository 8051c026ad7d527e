"""Layer 1: Prometheus metrics fed by (fake) Celery signal calls carrying real task results."""

from __future__ import annotations

import json
import logging
import socket
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dspex_tasks.dsl.signature import SignatureRegistry, signature
from dspex_tasks.errors import LMError, ValidationError
from dspex_tasks.observability import prometheus as mp
from dspex_tasks.observability import tracing
from dspex_tasks.programs.cache import CacheStats
from dspex_tasks.programs.store import MemoryProgramStore
from dspex_tasks.settings import Settings
from dspex_tasks.worker.runtime import Runtime

pytestmark = pytest.mark.unit


def value(name: str, **labels: str) -> float:
    return mp.REGISTRY.get_sample_value(name, labels) or 0.0


def total(name: str) -> float:
    """The sum of every sample of a metric family (all label values)."""
    return sum(s.value for fam in mp.REGISTRY.collect() for s in fam.samples if s.name == name)


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    reg = SignatureRegistry()
    reg.add(signature("question: str -> answer: str, confidence: confidence_score", name="qa", register=False))
    rt = Runtime(Settings(), store=MemoryProgramStore(), signatures=reg)
    rt.warm(publish=False, listen=False)
    yield rt
    rt.close()


def fake_task(name: str, rt: Runtime | None = None) -> Any:
    return SimpleNamespace(name=name, app=SimpleNamespace(_runtime=rt))


def run_signals(task: Any, task_id: str, state: str, retval: Any, kwargs: dict[str, Any] | None = None) -> None:
    """What Celery's tracer sends around one task execution."""
    mp.on_task_prerun(sender=task, task_id=task_id, task=task, args=(), kwargs=kwargs or {})
    mp.on_task_postrun(sender=task, task_id=task_id, task=task, args=(), kwargs=kwargs or {}, retval=retval,
                       state=state)


def test_success_counts_signature_duration_lm_tokens_and_cache(runtime: Runtime) -> None:
    # Given a real result of the qa task and the runtime's cache counters
    sig = runtime.signatures.get("qa")
    result = runtime.predict(sig, {"question": "why?"}, session="s-metrics")
    result["task_id"] = "t-1"
    before = {k: value(k, signature="qa", outcome="success") for k in ("dspex_tasks_total",)}
    count0 = value("dspex_task_duration_seconds_count", signature="qa")
    calls0 = value("dspex_lm_calls_total", model="mock/dspex")
    prompt0 = value("dspex_lm_tokens_total", model="mock/dspex", kind="prompt")
    completion0 = value("dspex_lm_tokens_total", model="mock/dspex", kind="completion")
    cost0 = value("dspex_lm_cost_usd_total", model="mock/dspex")
    lookups0 = value("dspex_program_cache_hits_total") + value("dspex_program_cache_misses_total")
    exported = getattr(runtime.cache.stats, "_dspex_exported", (0, 0))
    # When the task's prerun and postrun signals fire
    run_signals(fake_task("dspex.qa", runtime), "t-1", "SUCCESS", result,
                {"inputs": {"question": "why?"}, "session": "s-metrics", "program": None})
    # Then one success, one duration, one LM call with the result's tokens (the mock costs nothing)
    assert value("dspex_tasks_total", signature="qa", outcome="success") == before["dspex_tasks_total"] + 1
    assert value("dspex_task_duration_seconds_count", signature="qa") == count0 + 1
    assert value("dspex_lm_calls_total", model="mock/dspex") == calls0 + 1
    usage = result["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert value("dspex_lm_tokens_total", model="mock/dspex", kind="prompt") == prompt0 + usage["prompt_tokens"]
    assert (value("dspex_lm_tokens_total", model="mock/dspex", kind="completion")
            == completion0 + usage["completion_tokens"])
    assert value("dspex_lm_cost_usd_total", model="mock/dspex") == cost0
    # and the cache's plain counters are exported (the session lookup was a miss)
    stats = runtime.cache.stats
    grown = (stats.hits + stats.misses) - sum(exported)
    assert value("dspex_program_cache_hits_total") + value("dspex_program_cache_misses_total") == lookups0 + grown
    assert value("dspex_program_cache_size") == stats.size >= 1


def test_duration_lands_in_llm_buckets(runtime: Runtime) -> None:
    assert mp.DURATION_BUCKETS[0] == 0.005 and mp.DURATION_BUCKETS[-1] == 120.0
    le_5 = value("dspex_task_duration_seconds_bucket", signature="slow", le="5.0")
    le_10 = value("dspex_task_duration_seconds_bucket", signature="slow", le="10.0")
    mp.on_task_postrun(task_id="t-slow", task=fake_task("dspex.slow"), kwargs={}, state="SUCCESS",
                       retval={"outputs": {}, "usage": {}, "lm": "mock/dspex", "duration_ms": 7000.0})
    # no prerun: the result's own duration_ms is used
    assert value("dspex_task_duration_seconds_bucket", signature="slow", le="5.0") == le_5
    assert value("dspex_task_duration_seconds_bucket", signature="slow", le="10.0") == le_10 + 1


def test_failure_and_retry_outcomes() -> None:
    fail0 = value("dspex_tasks_total", signature="qa", outcome="failure")
    retry0 = value("dspex_tasks_total", signature="qa", outcome="retry")
    calls0 = total("dspex_lm_calls_total")
    task = fake_task("dspex.qa")
    run_signals(task, "t-f", "FAILURE", ValidationError.from_errors("inputs", [{"field": "q", "message": "x"}]))
    run_signals(task, "t-r", "RETRY", LMError("LM call for signature 'qa' failed (RateLimitError): slow down"))
    assert value("dspex_tasks_total", signature="qa", outcome="failure") == fail0 + 1
    assert value("dspex_tasks_total", signature="qa", outcome="retry") == retry0 + 1
    assert total("dspex_lm_calls_total") == calls0  # no result, no LM call counted


def test_map_counts_each_item(runtime: Runtime) -> None:
    sig = runtime.signatures.get("qa")
    items = [{"question": "a"}, {"question": "b"}, {"question": 3}]
    results = runtime.predict_many(sig, items, session="s-map")
    assert "error" in results[2] and "error" not in results[0]
    ok0 = value("dspex_tasks_total", signature="qa", outcome="success")
    bad0 = value("dspex_tasks_total", signature="qa", outcome="failure")
    durations0 = value("dspex_task_duration_seconds_count", signature="qa")
    prompt0 = value("dspex_lm_tokens_total", model="mock/dspex", kind="prompt")
    kwargs = {"signature": "qa", "items": items, "session": "s-map", "program": None}
    run_signals(fake_task("dspex.map", runtime), "t-map", "SUCCESS", {"results": results}, kwargs)
    assert value("dspex_tasks_total", signature="qa", outcome="success") == ok0 + 2
    assert value("dspex_tasks_total", signature="qa", outcome="failure") == bad0 + 1
    assert value("dspex_task_duration_seconds_count", signature="qa") == durations0 + 2
    assert (value("dspex_lm_tokens_total", model="mock/dspex", kind="prompt")
            == prompt0 + sum(r["usage"]["prompt_tokens"] for r in results[:2]))
    # a map message that fails as a whole fails every item
    run_signals(fake_task("dspex.map"), "t-map2", "FAILURE", ValidationError("bad"), kwargs)
    assert value("dspex_tasks_total", signature="qa", outcome="failure") == bad0 + 1 + 3


@pytest.mark.parametrize("name", ["dspex.optimize.stage", "dspex.optimize.eval_chunk", "dspex.optimize.scheduled",
                                  "celery.chord_unlock", "other.task"])
def test_other_tasks_are_not_per_signature_metrics(name: str) -> None:
    before = total("dspex_tasks_total")
    run_signals(fake_task(name), "t-x", "SUCCESS", {"run_id": "r", "stage": "load"})
    assert total("dspex_tasks_total") == before
    assert mp.signature_of(name) is None
    assert mp.signature_of("dspex.map", {"signature": "classify"}) == "classify"
    assert mp.signature_of("dspex.complex_analysis") == "complex_analysis"


def test_label_values_are_bounded_by_the_served_signatures(runtime: Runtime) -> None:
    # A dspex.* task that is not a signature is not counted; a map of an unknown signature counts as "unknown"
    app = SimpleNamespace(_runtime=None, dspex_signatures=runtime.signatures)
    before = total("dspex_tasks_total")
    unknown0 = value("dspex_tasks_total", signature="unknown", outcome="failure")
    run_signals(SimpleNamespace(name="dspex.gateway.ping", app=app), "t-g", "SUCCESS", {"ok": True})
    assert total("dspex_tasks_total") == before
    run_signals(SimpleNamespace(name="dspex.map", app=app), "t-u", "FAILURE", ValidationError("unknown signature"),
                {"signature": "no-such-" + "x" * 40, "items": [{"q": 1}]})
    assert value("dspex_tasks_total", signature="unknown", outcome="failure") == unknown0 + 1
    assert total("dspex_tasks_total") == before + 1


def test_postrun_never_raises_and_ignores_other_states() -> None:
    before = total("dspex_tasks_total")
    mp.on_task_postrun(task_id=None, task=None, kwargs=None, retval=None, state=None)
    mp.on_task_postrun(task_id="t", task=fake_task("dspex.qa"), kwargs="junk", retval=object(), state="REVOKED")
    mp.on_task_postrun(task_id="t", task=fake_task("dspex.map"), kwargs={"signature": "qa"}, retval={"results": 7},
                       state="SUCCESS")
    assert total("dspex_tasks_total") == before + 1  # the malformed map result counts as one failed message


def test_cost_from_litellms_price_table() -> None:
    # Given LiteLLM's bundled price table: a known model costs something, a mock endpoint nothing
    assert mp.estimate_cost("gpt-4o-mini", 1000, 500) > 0
    assert mp.estimate_cost("openai/gpt-4o-mini", 1000, 500) == pytest.approx(mp.estimate_cost("gpt-4o-mini", 1000,
                                                                                                500))
    assert mp.estimate_cost("openai/mock", 1000, 500) == 0.0
    assert mp.estimate_cost("mock/dspex", 1000, 500) == 0.0
    assert mp.estimate_cost("gpt-4o-mini", 0, 0) == 0.0
    cost0 = value("dspex_lm_cost_usd_total", model="gpt-4o-mini")
    mp.record_lm("gpt-4o-mini", {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500})
    assert value("dspex_lm_cost_usd_total", model="gpt-4o-mini") == pytest.approx(
        cost0 + mp.estimate_cost("gpt-4o-mini", 1000, 500))
    mock0 = value("dspex_lm_cost_usd_total", model="openai/mock")
    mp.record_lm("openai/mock", {"prompt_tokens": 1000, "completion_tokens": 500})
    assert value("dspex_lm_cost_usd_total", model="openai/mock") == mock0


def test_cache_counters_exported_as_deltas() -> None:
    hits0, misses0 = value("dspex_program_cache_hits_total"), value("dspex_program_cache_misses_total")
    stats = CacheStats(hits=3, misses=2, size=5)
    mp.sync_cache(stats)
    mp.sync_cache(stats)  # nothing new: nothing added
    assert (value("dspex_program_cache_hits_total"), value("dspex_program_cache_misses_total")) == (hits0 + 3,
                                                                                                  misses0 + 2)
    assert value("dspex_program_cache_size") == 5
    stats.hits += 4
    stats.size = 6
    mp.sync_cache(stats)
    assert value("dspex_program_cache_hits_total") == hits0 + 7
    assert value("dspex_program_cache_size") == 6
    fresh = CacheStats(hits=1, misses=1, size=1)  # a new runtime (a forked child) starts from zero
    mp.sync_cache(fresh)
    assert value("dspex_program_cache_hits_total") == hits0 + 8
    assert value("dspex_program_cache_misses_total") == misses0 + 3


def test_optimization_runs_and_promotions() -> None:
    ok0 = value("dspex_optimization_runs_total", optimizer="bootstrap_fewshot", outcome="succeeded")
    failed0 = value("dspex_optimization_runs_total", optimizer="bootstrap_fewshot", outcome="failed")
    promoted0 = value("dspex_promotions_total", signature="qa")
    mp.record_run("bootstrap_fewshot", "succeeded", promoted="qa")
    mp.record_run("bootstrap_fewshot", "succeeded", promoted=None)
    mp.record_run("bootstrap_fewshot", "failed")
    assert value("dspex_optimization_runs_total", optimizer="bootstrap_fewshot", outcome="succeeded") == ok0 + 2
    assert value("dspex_optimization_runs_total", optimizer="bootstrap_fewshot", outcome="failed") == failed0 + 1
    assert value("dspex_promotions_total", signature="qa") == promoted0 + 1


def test_snapshot_mirrors_the_counters_for_redis(runtime: Runtime) -> None:
    mp.reset_snapshot()
    sig = runtime.signatures.get("qa")
    for i in range(3):
        res = runtime.predict(sig, {"question": f"q{i}"}, session="s-snap")
        run_signals(fake_task("dspex.qa", runtime), f"t-s{i}", "SUCCESS", res)
    run_signals(fake_task("dspex.qa"), "t-s-f", "FAILURE", LMError("boom"))
    mp.record_run("random_search", "succeeded", promoted="qa")
    snap = json.loads(mp.snapshot_json(runtime.cache.stats))
    assert snap["tasks"] == {"qa": {"success": 3, "failure": 1}}
    assert snap["lm"]["mock/dspex"]["calls"] == 3 and snap["lm"]["mock/dspex"]["prompt_tokens"] > 0
    assert snap["lm"]["mock/dspex"]["cost_usd"] == 0
    assert snap["runs"] == {"random_search": {"succeeded": 1}} and snap["promotions"] == {"qa": 1}
    assert "port" not in snap


class FakeRedis:
    def __init__(self, hashes: dict[str, dict[str, str]]) -> None:
        self.hashes = hashes

    def scan_iter(self, match: str, count: int = 0) -> Iterator[bytes]:
        prefix = match.rstrip("*")
        return iter([k.encode() for k in self.hashes if k.startswith(prefix)])

    def hgetall(self, key: bytes) -> dict[bytes, bytes]:
        return {k.encode(): v.encode() for k, v in self.hashes[key.decode()].items()}


def test_status_sums_the_worker_snapshots() -> None:
    from dspex_tasks.observability.status import worker_stats

    a = {"tasks": {"qa": {"success": 3, "failure": 1}}, "lm": {"openai/mock": {"calls": 3, "prompt_tokens": 30,
                                                                              "completion_tokens": 6, "cost_usd": 0}},
         "runs": {}, "promotions": {}, "port": 9100}
    b = {"tasks": {"qa": {"success": 2}, "classify": {"retry": 1}}, "lm": {"openai/mock": {
        "calls": 2, "prompt_tokens": 20, "completion_tokens": 4, "cost_usd": 0.5}}, "runs": {"miprov2": {"failed": 1}},
         "promotions": {"qa": 1}}
    redis = FakeRedis({
        "ns:workers:h1:10": {"hits": "4", "misses": "1", "evictions": "0", "invalidations": "0", "size": "1",
                             "metrics": json.dumps(a)},
        "ns:workers:h2:11": {"hits": "1", "misses": "4", "evictions": "0", "invalidations": "0", "size": "2",
                             "metrics": json.dumps(b)},
        "ns:workers:h3:12": {"hits": "0", "misses": "0", "size": "0"},  # an older worker: no metrics field
    })
    cache, metrics = worker_stats(redis, "ns")
    assert cache["processes"] == 3 and cache["hit_rate"] == 0.5
    assert metrics["processes"] == 2
    assert metrics["tasks"] == {"classify": {"retry": 1}, "qa": {"success": 5, "failure": 1}}
    assert metrics["tasks_total"] == {"success": 5, "failure": 1, "retry": 1}
    assert metrics["lm"]["openai/mock"] == {"calls": 5, "prompt_tokens": 50, "completion_tokens": 10, "cost_usd": 0.5}
    assert metrics["optimization_runs"] == {"miprov2": {"failed": 1}} and metrics["promotions"] == {"qa": 1}
    assert metrics["endpoints"] == ["h1:9100"] and metrics["cache_hit_rate"] == 0.5


def test_status_table_renders_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    from dspex_tasks.cli.status import _print_metrics

    _print_metrics({"processes": 1, "tasks": {"qa": {"success": 4, "retry": 1}}, "tasks_total": {"success": 4,
                                                                                                  "retry": 1},
                    "lm": {"gpt-4o-mini": {"calls": 4, "prompt_tokens": 40, "completion_tokens": 8,
                                           "cost_usd": 0.0012}},
                    "optimization_runs": {"miprov2": {"succeeded": 1}}, "promotions": {"qa": 1},
                    "endpoints": ["h1:9100"], "cache_hit_rate": 0.75})
    out = capsys.readouterr().out
    assert "qa" in out and "h1:9100" in out and "gpt-4o-mini" in out and "promotions 1" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_server_serves_metrics_and_skips_a_busy_port() -> None:
    mp.stop_server()
    busy = socket.socket()
    busy.bind(("0.0.0.0", 0))
    busy.listen()
    port = int(busy.getsockname()[1])
    try:
        bound = mp.start_server(port)
        assert bound != port and port < bound < port + mp.PORT_SCAN
        assert mp.start_server(port) == bound == mp.served_port()  # once per process
        text = urllib.request.urlopen(f"http://127.0.0.1:{bound}/metrics", timeout=5).read().decode()
        assert "# TYPE dspex_tasks_total counter" in text
        assert "# TYPE dspex_task_duration_seconds histogram" in text
        assert mp.snapshot()["port"] == bound
    finally:
        mp.stop_server()
        busy.close()
    assert mp.served_port() is None
    bound = mp.start_server(0)
    try:
        assert bound > 0 and "dspex_lm_calls_total" in urllib.request.urlopen(
            f"http://127.0.0.1:{bound}/metrics", timeout=5).read().decode()
    finally:
        mp.stop_server()


def test_worker_init_serves_only_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    mp.stop_server()
    app = SimpleNamespace(dspex_settings=Settings(), conf=SimpleNamespace(worker_pool="threads"))
    mp.on_worker_init(sender=SimpleNamespace(app=app, pool_cls="threads"))
    assert mp.served_port() is None
    port = _free_port()
    app = SimpleNamespace(dspex_settings=Settings(metrics_port=port), conf=SimpleNamespace(worker_pool="prefork"))
    mp.on_worker_init(sender=SimpleNamespace(app=app, pool_cls="prefork"))
    # prefork without PROMETHEUS_MULTIPROC_DIR: the children serve, each from the base port
    assert mp.served_port() is None and mp._pending_child_port == port
    monkeypatch.setattr(mp, "_pending_child_port", None)
    mp.on_worker_process_init(sender="w@h")
    assert mp.served_port() is None
    app = SimpleNamespace(dspex_settings=Settings(metrics_port=port), conf=SimpleNamespace(worker_pool="threads"))
    mp.on_worker_init(sender=SimpleNamespace(app=app, pool_cls="threads"))
    try:
        assert mp.served_port() == port
    finally:
        mp.stop_server()


def test_install_connects_each_handler_once() -> None:
    from celery import signals

    watched = (signals.task_prerun, signals.task_postrun, signals.worker_init, signals.worker_process_init,
               signals.worker_process_shutdown)
    mp.install()
    tracing.install(Settings(otel=True))
    before = [len(sig.receivers) for sig in watched]
    mp.install(object())
    tracing.install(Settings(otel=True))
    assert [len(sig.receivers) for sig in watched] == before


def test_settings_read_the_metrics_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPEX_METRICS_PORT", "9123")
    monkeypatch.setenv("DSPEX_OTEL", "1")
    s = Settings()
    assert s.metrics_port == 9123 and s.otel is True
    monkeypatch.delenv("DSPEX_METRICS_PORT")
    assert Settings().metrics_port is None


def test_tracing_off_unless_the_setting_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery import signals

    monkeypatch.setattr(tracing, "_done_pid", None)
    signals.worker_init.disconnect(dispatch_uid="dspex.tracing.worker_init")
    signals.worker_process_init.disconnect(dispatch_uid="dspex.tracing.process_init")
    monkeypatch.setenv("DSPEX_OTEL", "1")  # the environment alone does nothing: Settings.otel decides
    assert tracing.install(Settings(otel=False)) is False
    uids = {key[0] for key, _ in signals.worker_process_init.receivers}
    assert "dspex.tracing.process_init" not in uids
    assert tracing.install(Settings(otel=True)) is True


def test_tracing_requested_but_not_installed_warns_with_the_hint(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("DSPEX_OTEL", "1")
    monkeypatch.setitem(sys.modules, "opentelemetry.instrumentation.celery", None)  # import fails
    monkeypatch.setattr(tracing, "_warned", False)
    monkeypatch.setattr(tracing, "_done_pid", None)
    with caplog.at_level(logging.WARNING, logger="dspex_tasks.observability.tracing"):
        assert tracing.setup_tracing(sender="w@h") is False
        assert tracing.setup_tracing() is False  # and only one warning
    warnings = [r for r in caplog.records if r.name == "dspex_tasks.observability.tracing"]
    assert len(warnings) == 1 and "pip install dspex-tasks[otel]" in warnings[0].getMessage()
    # a worker_init with the threads pool takes the same safe path
    tracing._on_worker_init(sender=SimpleNamespace(pool_cls="threads", app=None))


def test_failure_retry_and_in_flight_series_exist_at_zero_after_warm(runtime: Runtime) -> None:
    from prometheus_client import generate_latest

    text = generate_latest(mp.REGISTRY).decode()
    # a dashboard's rate(failures) and alerts find the series before the first failure happens
    for line in ('dspex_tasks_total{outcome="failure",signature="qa"}', 'dspex_tasks_total{outcome="retry",signature="qa"}',
                 'dspex_tasks_in_flight{signature="qa"}', 'dspex_lm_calls_total{model="mock/dspex"}',
                 'dspex_optimization_runs_total{optimizer="miprov2",outcome="failed"}'):
        assert line in text, line
    # and the standard process and garbage-collector series sit beside them
    assert "process_resident_memory_bytes" in text and "python_gc_collections_total" in text
    assert "python_info" in text


def test_in_flight_rises_while_a_prediction_runs_and_falls_after(runtime: Runtime) -> None:
    task = fake_task("dspex.qa", runtime)
    before = value("dspex_tasks_in_flight", signature="qa")
    mp.on_task_prerun(sender=task, task_id="if-1", task=task, args=(), kwargs={})
    assert value("dspex_tasks_in_flight", signature="qa") == before + 1
    mp.on_task_postrun(sender=task, task_id="if-1", task=task, args=(), kwargs={}, retval=None, state="FAILURE")
    assert value("dspex_tasks_in_flight", signature="qa") == before


def test_metrics_bind_loopback_unless_the_setting_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().metrics_host == "127.0.0.1"
    monkeypatch.setenv("DSPEX_METRICS_HOST", "0.0.0.0")
    assert Settings().metrics_host == "0.0.0.0"
    mp.stop_server()
    port = _free_port()
    app = SimpleNamespace(dspex_settings=Settings(metrics_port=port, metrics_host="127.0.0.1"),
                          conf=SimpleNamespace(worker_pool="threads"))
    mp.on_worker_init(sender=SimpleNamespace(app=app, pool_cls="threads"))
    try:
        assert mp._server is not None and mp._server.server_address[0] == "127.0.0.1"
        assert mp._serving_note is not None and f"http://127.0.0.1:{port}/metrics" in mp._serving_note
    finally:
        mp.stop_server()


def test_promtool_accepts_the_exposition(runtime: Runtime, tmp_path: Any) -> None:
    """`promtool check metrics` on a worker's exposition after real signal traffic (CI installs promtool)."""
    import os
    import shutil
    import subprocess

    from prometheus_client import generate_latest

    local = Path(__file__).resolve().parents[2] / ".cache" / "bin" / "promtool"  # where scripts/ci-deps.sh puts it
    promtool = os.environ.get("DSPEX_TEST_PROMTOOL") or shutil.which("promtool") or (str(local) if local.exists() else None)
    if not promtool:
        if os.environ.get("DSPEX_REQUIRE_PROMTOOL") == "1":
            pytest.fail("DSPEX_REQUIRE_PROMTOOL=1 but no promtool on PATH or in DSPEX_TEST_PROMTOOL")
        pytest.skip("promtool is not installed (scripts/ci-deps.sh installs it)")
    task = fake_task("dspex.qa", runtime)
    run_signals(task, "pt-1", "SUCCESS", {"outputs": {"answer": "a"}, "lm": "openai/gpt-4o-mini", "duration_ms": 12,
                                          "usage": {"prompt_tokens": 10, "completion_tokens": 3}})
    run_signals(task, "pt-2", "FAILURE", None)
    text = generate_latest(mp.REGISTRY)
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
