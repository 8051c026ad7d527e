"""The scenarios of ``benchmarks/run.py`` that ``bench_runtime.py`` does not already have.

Each takes a :class:`benchmarks.bench_runtime.Context` and returns an ``Outcome`` of ``Row`` s, like the
scenarios of ``bench_runtime.py``: queue latency at light load, cold start of ``dspex worker --processes 8``
with pre-warmed sessions, the in-process program cache, the shared Redis LM cache, and scaling over 1-3
worker processes on the I/O-bound workload (with a PNG plot).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import ROOT, ManagedProcess, MockLMProcess, WorkerProcess, child_env, date_done, wait_results
from benchmarks.bench_runtime import (
    SIGNATURE,
    Context,
    Outcome,
    Row,
    client_settings,
    dspex_worker_env,
    question,
)

OUT_DIR = ROOT / "benchmarks" / "out"
DOCS_PNG = ROOT / "docs" / "throughput.png"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def http_env(ctx: Context, mock: MockLMProcess, concurrency: int, **extra: str) -> dict[str, str]:
    return dspex_worker_env(ctx, concurrency, DSPEX_LM="openai/mock", DSPEX_LM_API_BASE=mock.api_base,
                            DSPEX_LM_API_KEY="sk-bench", DSPEX_LM_NUM_RETRIES="0", **extra)


# -- latency at light load ------------------------------------------------------------
def scenario_latency(ctx: Context) -> Outcome:
    """Sequential ``Client.submit(...).get()`` against a 50 ms HTTP mock, minus the 50 ms; vs direct DSPy."""
    import dspy

    import signatures
    from dspex_tasks.client import Client

    n = 60 if ctx.quick else 300
    latency_ms = 50.0
    mock = MockLMProcess(latency_ms=latency_ms, log_dir=ctx.log_dir)
    worker = WorkerProcess("workers.app", redis_url=ctx.url, queues="dspex.predict", concurrency=4,
                           log_dir=ctx.log_dir, name="dspex-latency", env=http_env(ctx, mock, 4))
    client = Client(settings=client_settings(ctx))
    ours: list[float] = []
    direct: list[float] = []
    try:
        mock.wait_ready()
        worker.wait_ready()
        for i in range(10):  # warm-up, untimed
            client.submit(SIGNATURE, question(10**7 + i), session="bench-lat").get(timeout=30)
        for i in range(n):
            t0 = time.perf_counter()
            client.submit(SIGNATURE, question(i), session="bench-lat").get(timeout=30)
            ours.append((time.perf_counter() - t0) * 1000 - latency_ms)
        raw = raw_http_ms(mock, n)
        lm = dspy.LM("openai/mock", api_base=mock.api_base, api_key="sk-bench", cache=False, num_retries=0)
        predict = dspy.Predict(signatures.qa.to_dspy())
        with dspy.context(lm=lm):
            for i in range(5):
                predict(**question(10**8 + i))
            for i in range(n):
                t0 = time.perf_counter()
                predict(**question(10**9 + i))
                direct.append((time.perf_counter() - t0) * 1000 - latency_ms)
    finally:
        client.close()
        worker.stop()
        mock.stop()
    p50, p99 = statistics.median(ours), pct(ours, 99)
    d50, d99 = statistics.median(direct), pct(direct, 99)
    rows = [
        Row("latency", f"submit().get() minus {latency_ms:.0f} ms mock, p50 (sequential)", p50, "ms", d50,
            "direct dspy.Predict", p50 / d50 if d50 > 0 else None, "<= 5 ms", p50 <= 5.0),
        Row("latency", f"submit().get() minus {latency_ms:.0f} ms mock, p99 (sequential)", p99, "ms", d99,
            "direct dspy.Predict", p99 / d99 if d99 > 0 else None),
        Row("latency", "  queue share of p50 (dspex p50 - direct p50)", p50 - d50, "ms", None, "", None,
            "<= 5 ms", p50 - d50 <= 5.0),
        Row("latency", "  mock round trip minus 50 ms, plain urllib (new conn), p50", statistics.median(raw), "ms"),
    ]
    return Outcome(rows, {"n": n, "latency_ms": latency_ms, "ours_ms": [round(x, 3) for x in ours],
                          "direct_ms": [round(x, 3) for x in direct], "raw_http_ms": [round(x, 3) for x in raw]})


def raw_http_ms(mock: MockLMProcess, n: int) -> list[float]:
    """One completion request at a time over a new connection (``urllib``), minus the mock's latency."""
    import json
    import urllib.request

    body = json.dumps({"model": "mock", "messages": [{"role": "user", "content": "[[ ## question ## ]]\nhi"}]})
    out = []
    for _ in range(n):
        req = urllib.request.Request(mock.api_base + "/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback only
            resp.read()
        out.append((time.perf_counter() - t0) * 1000 - 50.0)
    return out


# -- cold start -----------------------------------------------------------------------------
def scenario_coldstart(ctx: Context) -> Outcome:
    """``dspex worker --processes 8`` with 100 stored session programs: launch -> first served task."""
    import signatures
    from dspex_tasks.client import Client
    from dspex_tasks.programs.bridge import build_module
    from dspex_tasks.programs.state import dump_program

    procs, sessions = 8, 100
    client = Client(settings=client_settings(ctx))
    state = dump_program(build_module(signatures.qa))
    for i in range(sessions):
        client.programs.put(f"cold{i:03d}", SIGNATURE, state, signature=SIGNATURE)
    env = child_env(ctx.url, **dspex_worker_env(ctx, 2, DSPEX_PREWARM_SESSIONS=str(sessions)))
    # Sent raw: no worker has published the signatures yet, so Client.submit could not validate it.
    job = client.app.send_task(f"dspex.{SIGNATURE}", kwargs={"inputs": question(1), "session": "cold000",
                                                             "program": None}, queue="dspex.predict")
    key = client.app.backend.get_key_for_task(job.id)
    argv = [sys.executable, "-m", "dspex_tasks", "worker", "--processes", str(procs), "-Q", "dspex.predict",
            "-P", "threads", "-c", "2", "-n", "cold@bench"]
    t0 = time.time()
    group = ManagedProcess("dspex-worker-x8", argv, env, ctx.log_dir)
    try:
        _, results = wait_results(client.redis, [key], timeout_s=300)
        first = (date_done(results[0]) or time.time()) - t0
        deadline = time.monotonic() + 120
        ready_at: float | None = None
        while time.monotonic() < deadline:
            if group.log().count("ready.") >= procs:
                ready_at = time.time() - t0
                break
            time.sleep(0.1)
        warm_lines = [ln for ln in group.log().splitlines() if " warm: " in ln]
    finally:
        group.stop(30)
        client.close()
    rows = [
        Row("cold start", f"dspex worker --processes {procs}, {sessions} sessions: launch -> 1st task served",
            first * 1000, "ms", 30.0, "DSPex 8 bare workers", first * 1000 / 30.0, "~10-30 ms (DSPex)",
            first * 1000 <= 30.0),
    ]
    if ready_at is not None:
        rows.append(Row("cold start", f"  launch -> all {procs} processes ready", ready_at * 1000, "ms"))
    return Outcome(rows, {"processes": procs, "sessions": sessions, "first_task_s": round(first, 3),
                          "all_ready_s": None if ready_at is None else round(ready_at, 3),
                          "warm_log_lines": warm_lines[:procs]})


# -- program cache ----------------------------------------------------------------------
def scenario_progcache(ctx: Context) -> Outcome:
    """``ProgramCache.get`` on a real ``ProgramStore`` (private Redis) with ``load_program``: hit vs miss."""
    import redis as redis_lib

    import signatures
    from dspex_tasks.programs.bridge import build_module
    from dspex_tasks.programs.cache import ProgramCache
    from dspex_tasks.programs.state import dump_program, load_program
    from dspex_tasks.programs.store import ProgramStore

    n = 300 if ctx.quick else 2000
    r = redis_lib.Redis.from_url(ctx.url)
    store = ProgramStore(redis=r, namespace=ctx.namespace)
    module = build_module(signatures.qa)
    state = dump_program(module)
    demos = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(4)]  # a realistic optimized program
    for part in [state, *[v for v in state.values() if isinstance(v, dict)]]:
        if "demos" in part:
            part["demos"] = demos
    sessions = [f"pc{i:05d}" for i in range(n)]
    for s in sessions:
        store.put(s, SIGNATURE, state, signature=SIGNATURE)

    def build(_program: str, record: Any) -> Any:
        return load_program(signatures.qa, record.state if record else None)

    def timed(cache: ProgramCache, keys: list[str]) -> list[float]:
        out = []
        for s in keys:
            t0 = time.perf_counter()
            cache.get(s, SIGNATURE)
            out.append((time.perf_counter() - t0) * 1e6)
        return out

    cache = ProgramCache(store, build, max_size=n + 10, verify_s=60.0)
    miss = timed(cache, sessions)
    hit = timed(cache, sessions)
    verify = ProgramCache(store, build, max_size=n + 10, verify_s=0.0)
    timed(verify, sessions)
    hit_verified = timed(verify, sessions)
    r.close()
    m_miss, m_hit, m_ver = statistics.median(miss), statistics.median(hit), statistics.median(hit_verified)
    rows = [
        Row("program cache", "ProgramCache.get warm hit (within verify_s), p50", m_hit, "us"),
        Row("program cache", "ProgramCache.get hit + version check (Redis GET), p50", m_ver, "us"),
        Row("program cache", "ProgramCache.get miss (Redis + load_program), p50", m_miss, "us", None, "",
            m_miss / m_hit if m_hit else None, "miss/hit ratio"),
        Row("program cache", "  miss p99", pct(miss, 99), "us"),
    ]
    return Outcome(rows, {"n": n, "hit_p99_us": round(pct(hit, 99), 2), "miss_p99_us": round(pct(miss, 99), 2),
                          "verify_p99_us": round(pct(hit_verified, 99), 2)})


# -- shared LM cache -------------------------------------------------------------------------
def lm_cache_available() -> bool:
    try:
        from dspex_tasks.lm.cache import LMCache  # noqa: F401
        from dspex_tasks.lm.governed import plan_lm  # noqa: F401
        from dspex_tasks.settings import Settings
    except ImportError:
        return False
    return "lm_shared_cache" in Settings.model_fields


def scenario_lmcache(ctx: Context) -> Outcome:
    """The same prompts twice through ``Client.map``: provider calls per pass with and without the shared cache."""
    from dspex_tasks.client import Client

    n = 100 if ctx.quick else 400
    mock = MockLMProcess(latency_ms=50.0, log_dir=ctx.log_dir)
    client = Client(settings=client_settings(ctx))
    calls: dict[str, list[int]] = {}
    try:
        mock.wait_ready()
        for mode, flag, offset in (("without", "0", 0), ("with", "1", 10**6)):
            worker = WorkerProcess("workers.app", redis_url=ctx.url, queues="dspex.predict", concurrency=32,
                                   log_dir=ctx.log_dir, name=f"dspex-lmcache-{mode}",
                                   env=http_env(ctx, mock, 32, DSPEX_LM_SHARED_CACHE=flag))
            try:
                worker.wait_ready()
                items = [question(offset + i) for i in range(n)]
                calls[mode] = []
                for _ in range(2):
                    mock.reset_stats()
                    client.map(SIGNATURE, items, session=f"bench-lmc-{mode}")
                    calls[mode].append(int(mock.stats()["requests"]))
                print(f"  lmcache {mode:7s} shared cache: provider calls per pass {calls[mode]}", flush=True)
            finally:
                worker.stop()
    finally:
        client.close()
        mock.stop()
    rows = [
        Row("LM cache", f"provider calls, pass 1 ({n} prompts), with shared cache", calls["with"][0], "calls",
            calls["without"][0], "without"),
        Row("LM cache", "provider calls, pass 2 (same prompts), with shared cache", calls["with"][1], "calls",
            calls["without"][1], "without", None, "0 calls", calls["with"][1] == 0),
    ]
    return Outcome(rows, {"n": n, "calls_per_pass": calls})


# -- scaling ---------------------------------------------------------------------------------
def scenario_scaling(ctx: Context) -> Outcome:
    """1, 2, 3 worker processes on the I/O-bound workload (HTTP mock 200 ms); tasks/s and a PNG plot."""
    from dspex_tasks.client import Client

    threads = 64
    latency_ms = 200.0
    n = 400 if ctx.quick else 1500
    mock = MockLMProcess(latency_ms=latency_ms, log_dir=ctx.log_dir)
    client = Client(settings=client_settings(ctx))
    workers: list[WorkerProcess] = []
    points: list[dict[str, Any]] = []
    key_for = client.app.backend.get_key_for_task
    try:
        mock.wait_ready()
        for k in (1, 2, 3):
            w = WorkerProcess("workers.app", redis_url=ctx.url, queues="dspex.predict", concurrency=threads,
                              log_dir=ctx.log_dir, name=f"dspex-scale{k}", env=http_env(ctx, mock, threads))
            workers.append(w)
            w.wait_ready()
            warm = [key_for(client.submit(SIGNATURE, question(10**7 + k * 1000 + i), session="bench-scale").id)
                    for i in range(threads)]
            wait_results(client.redis, warm, timeout_s=120)
            mock.reset_stats()
            t0 = time.time()
            ids = [client.submit(SIGNATURE, question(k * 10**5 + i), session="bench-scale").id for i in range(n)]
            _, results = wait_results(client.redis, [key_for(i) for i in ids], timeout_s=600)
            done = [d for d in (date_done(r) for r in results) if d is not None]
            elapsed = max(done) - t0 if done else time.time() - t0
            stats = mock.stats()
            point = {"processes": k, "concurrency": k * threads, "n": n, "elapsed_s": round(elapsed, 3),
                     "tasks_per_s": n / elapsed, "ideal_tasks_per_s": k * threads / (latency_ms / 1000),
                     "max_in_flight": stats["max_in_flight"]}
            points.append(point)
            print(f"  scaling {k} proc(s) x {threads}: {point['tasks_per_s']:7.1f} tasks/s, max in flight "
                  f"{stats['max_in_flight']}", flush=True)
    finally:
        client.close()
        for w in workers:
            w.stop()
        mock.stop()
    png = plot(points, threads, latency_ms)
    base = points[0]["tasks_per_s"]
    rows = [Row("scaling", f"{p['processes']} proc x {threads} threads (HTTP mock {latency_ms:.0f} ms)",
                p["tasks_per_s"], "tasks/s", p["ideal_tasks_per_s"], "latency bound",
                p["tasks_per_s"] / base if p["processes"] > 1 else None, "speed-up vs 1 proc" if p["processes"] > 1
                else "") for p in points]
    return Outcome(rows, {"points": points, "png": str(png) if png else None})


def plot(points: list[dict[str, Any]], threads: int, latency_ms: float) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  matplotlib not installed: no plot", flush=True)
        return None
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    xs = [p["concurrency"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot(xs, [p["tasks_per_s"] for p in points], "o-", label="dspex workers (measured)")
    ax.plot(xs, [p["ideal_tasks_per_s"] for p in points], "--", color="grey",
            label=f"latency bound (concurrency / {latency_ms / 1000:g} s)")
    for p in points:
        ax.annotate(f"{p['processes']} proc", (p["concurrency"], p["tasks_per_s"]), textcoords="offset points",
                    xytext=(5, -12), fontsize=8)
    ax.set_xlabel(f"calls in flight (worker processes x {threads} threads)")
    ax.set_ylabel("tasks/s")
    ax.set_title(f"I/O-bound throughput, HTTP mock LM {latency_ms:.0f} ms")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = OUT_DIR / "throughput.png"
    fig.savefig(out)
    plt.close(fig)
    DOCS_PNG.parent.mkdir(parents=True, exist_ok=True)
    DOCS_PNG.write_bytes(out.read_bytes())
    return out
