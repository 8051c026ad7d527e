"""Live execution (issue 15): calls in flight on the async path, time to first token, memory, map vs single tasks.

Scenarios for ``benchmarks/run.py`` (``--scenarios inflight,ttft,livemem,mapio``). Each takes a
:class:`benchmarks.bench_runtime.Context` and returns an ``Outcome`` of ``Row`` s, like the others. Every
worker is a real ``celery -A workers.app worker`` OS process (threads pool); the LM is the HTTP mock LM in its
own OS process (``openai/mock`` through DSPy's LM); "in flight" is the mock's ``max_in_flight``.

* ``inflight``: HTTP mock at 1000 ms; two worker processes (``-c 200``), one on the async path (DSPy
  ``aforward`` on the process's event loop, ``DSPEX_ASYNC_MAX_IN_FLIGHT=500``) and one with
  ``DSPEX_ASYNC_MODULES=0`` (the thread path: the task's thread, and a 64-thread pool for map items), each on
  its own queue; the idle one is SIGSTOPped. Per round, in alternating order: single tasks pre-enqueued
  (``bench_runtime.pre_enqueued_run``) on each worker, ``Client.map`` with 500 items per chunk on each, and
  ``dspy.Parallel(num_threads=500)`` over ``dspy.Predict`` in a separate OS process (DSPy's price lookup
  memoized as in the worker, 5 LM objects so DSPy's 100-connection cap per LM does not bind) as the in-process
  reference at equal concurrency. Worker CPU per LM call from ``/proc/<pid>/stat``; the reference's from
  ``time.process_time()`` in its process. Plot: ``benchmarks/out/live_inflight.png`` (copied to
  ``docs/live_inflight.png`` by a default, non-quick run).
* ``ttft``: HTTP mock with a 200 ms first-chunk delay and 20 ms between chunks; ``Client.submit(...,
  stream=True)`` one at a time, followed with ``job.events()``: just before submit to the first ``token`` event
  at the client, minus 200 ms. Split with the mock's request log (arrival of the LM request) and the event's
  ``ts`` (written by the worker); the same streamed ``dspy.Predict`` in this process (``dspy.streamify``) is the
  reference. Then ``bench_suite.scenario_latency`` (unstreamed ``submit().get()`` minus a 50 ms mock).
* ``livemem``: worker RSS (``VmRSS``) before and after 10,000 streamed jobs (quick 2,000) at 0 latency with
  4-character chunks, in waves of 200; then RSS with 500 map items held in flight at 5 s latency (async path)
  and with 200 single tasks held on a ``DSPEX_ASYNC_MODULES=0`` worker, minus idle RSS, per call.
* ``mapio``: HTTP mock at 1000 ms, ``-c 200``: ``Client.map`` (default chunk size, async path with the loop's cap
  at 200, the threads' number) vs single tasks on the same worker, and the same on a ``DSPEX_ASYNC_MODULES=0``
  worker (the "before").

Standalone::

    python benchmarks/bench_live.py profile                      # py-spy breakdown of a worker's CPU on single tasks
    python benchmarks/bench_live.py profile --async-modules 0    # the same on the thread path
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before anything imports dspy / litellm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import (  # noqa: E402
    ROOT,
    ManagedProcess,
    MockLMProcess,
    WorkerProcess,
    child_env,
    cleanup_all,
    wait_results,
)
from benchmarks.bench_runtime import (  # noqa: E402
    SIGNATURE,
    Context,
    Outcome,
    Row,
    client_settings,
    cpu_s,
    median_run,
    pre_enqueued_run,
    question,
    ratio_row,
)
from benchmarks.bench_suite import http_env, pct  # noqa: E402

OUT_DIR = ROOT / "benchmarks" / "out"
DOCS_PNG = ROOT / "docs" / "live_inflight.png"
LATENCY_MS = 1000.0
THREADS = 200  # worker concurrency (-c)
MAP_CAP = 500  # DSPEX_ASYNC_MAX_IN_FLIGHT of the inflight async worker, and dspy.Parallel's threads
MAP_CHUNK = 500  # items per dspex.map message in inflight
MAP_POOL = 64  # dspex_tasks.worker.runtime.MAP_THREADS: the thread path's map pool
LM_CAP = 100  # DSPy 3.4's connections per LM object


# -- helpers -----------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (``VmRSS``), NaN when unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def knobs(mock: MockLMProcess, **values: Any) -> dict[str, Any]:
    """Set the mock LM's knobs at run time (``POST /_control``)."""
    return dict(mock._request("/_control", values))


class InFlightSampler:
    """Polls the mock's ``in_flight`` every ``period_s`` on a thread: ``(unix time, calls in flight)``."""

    def __init__(self, mock: MockLMProcess, period_s: float = 0.05) -> None:
        self.mock = mock
        self.period_s = period_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inflight-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                n = int(self.mock.stats()["in_flight"])
            except Exception:  # noqa: BLE001 - a missed sample is fine
                n = -1
            if n >= 0:
                self.samples.append((time.time(), n))
            self._stop.wait(self.period_s)

    def __enter__(self) -> InFlightSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def series(self, start: float | None = None, end: float | None = None) -> list[tuple[float, int]]:
        """Samples from ``start`` (default: one period before the first non-zero) to ``end``, time relative."""
        samples = [s for s in self.samples if end is None or s[0] <= end]
        if start is None:
            first = next((t for t, n in samples if n > 0), None)
            if first is None:
                return []
            start = first - self.period_s
        return [(round(t - start, 3), n) for t, n in samples if t >= start]


def live_worker(ctx: Context, mock: MockLMProcess, name: str, *, queue: str, async_modules: bool = True,
                cap: int | None = None, concurrency: int = THREADS, **env: str) -> WorkerProcess:
    """A dspex worker on its own queue, on the async path (``DSPEX_ASYNC_MODULES=1``) or the thread path."""
    extra = {"DSPEX_ASYNC_MODULES": "1" if async_modules else "0", "DSPEX_PREDICT_QUEUE": queue, **env}
    if cap is not None:
        extra["DSPEX_ASYNC_MAX_IN_FLIGHT"] = str(cap)
    return WorkerProcess("workers.app", redis_url=ctx.url, queues=queue, concurrency=concurrency,
                         log_dir=ctx.log_dir, name=name, env=http_env(ctx, mock, concurrency, **extra))


def queue_client(ctx: Context, queue: str) -> Any:
    from dspex_tasks.client import Client

    return Client(settings=client_settings(ctx, predict_queue=queue))


def single_run(worker: WorkerProcess, client: Any, mock: MockLMProcess, n: int, start: int) -> dict[str, Any]:
    """``n`` single tasks pre-enqueued on the paused ``worker``, then timed (``pre_enqueued_run``)."""

    def send(i: int) -> str:
        return str(client.submit(SIGNATURE, question(i), session="bench-live").id)

    mock.reset_stats()
    with InFlightSampler(mock) as sampler:
        run = pre_enqueued_run(worker, send, client.app.backend.get_key_for_task, client.redis, n, start=start,
                               extra_pids={"mock": mock.pid})
    run["max_in_flight"] = int(mock.stats()["max_in_flight"])
    run["cpu_ms_per_call"] = run["cpu_ms_per_task"]["worker"]
    run["series"] = sampler.series()
    return run


def map_run(worker: WorkerProcess, client: Any, mock: MockLMProcess, items: list[dict[str, Any]],
            chunk_size: int | None) -> dict[str, Any]:
    """``Client.map`` end to end (validate, send, collect) with ``worker`` resumed for it, paused after."""
    worker.resume()
    mock.reset_stats()
    try:
        with InFlightSampler(mock) as sampler:
            cpu0, mock0 = cpu_s(worker.pid), cpu_s(mock.pid)
            start = time.time()
            t0 = time.perf_counter()
            results = client.map(SIGNATURE, items, session="bench-live", chunk_size=chunk_size, timeout=900)
            elapsed = time.perf_counter() - t0
            cpu1, mock1 = cpu_s(worker.pid), cpu_s(mock.pid)
    finally:
        worker.pause()
    n = len(items)
    if len(results) != n:
        raise RuntimeError(f"map returned {len(results)} results for {n} inputs")
    return {"n": n, "chunk_size": chunk_size or client.settings.map_chunk_size, "elapsed_s": round(elapsed, 4),
            "tasks_per_s": n / elapsed, "max_in_flight": int(mock.stats()["max_in_flight"]),
            "cpu_ms_per_call": round((cpu1 - cpu0) * 1000 / n, 4),
            "mock_cpu_ms_per_call": round((mock1 - mock0) * 1000 / n, 4),
            "series": sampler.series(start)}


def parallel_run(ctx: Context, mock: MockLMProcess, n: int, threads: int, offset: int) -> dict[str, Any]:
    """``dspy.Parallel(num_threads=threads)`` in a separate OS process (``parallel-child``) on the same mock."""
    argv = [sys.executable, str(Path(__file__).resolve()), "parallel-child", "--api-base", mock.api_base,
            "--n", str(n), "--threads", str(threads), "--offset", str(offset)]
    child = ManagedProcess(f"parallel-{offset}", argv, child_env(None), ctx.log_dir)
    try:
        with InFlightSampler(mock) as sampler:
            child.proc.wait(timeout=600)
    finally:
        child.stop()
    out = child.log().strip().splitlines()
    doc = next((json.loads(line) for line in reversed(out) if line.startswith("{")), None)
    if child.proc.returncode != 0 or doc is None:
        raise RuntimeError(f"dspy.Parallel child failed ({child.proc.returncode}):\n{child.log()[-3000:]}")
    doc["series"] = sampler.series(doc["start"], doc["start"] + doc["elapsed_s"] + 0.2)
    return dict(doc)


def parallel_child(api_base: str, n: int, threads: int, offset: int) -> None:
    """The in-process reference: memoized DSPy (as the worker), one LM object per 100 threads, warm-up, one pass."""
    import urllib.request

    import dspy

    import signatures
    from dspex_tasks.worker.dspy_patches import apply_dspy_speedups

    apply_dspy_speedups()
    base = api_base.rsplit("/v1", 1)[0]

    def call(path: str, body: dict[str, Any] | None = None) -> Any:
        req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback only
            return json.loads(resp.read())

    k = max(1, math.ceil(threads / LM_CAP))
    predicts = []
    for _ in range(k):
        predict = dspy.Predict(signatures.qa.to_dspy())
        predict.set_lm(dspy.LM("openai/mock", api_base=api_base, api_key="sk-bench", cache=False, num_retries=0))
        predicts.append(predict)
    parallel = dspy.Parallel(num_threads=threads, disable_progress_bar=True)
    parallel([(predicts[i % k], question(10**8 + offset + i)) for i in range(threads)])  # warm-up, untimed
    call("/_control", {"reset_stats": True})
    proc0 = time.process_time()
    start = time.time()
    t0 = time.perf_counter()
    out = parallel([(predicts[i % k], question(offset + i)) for i in range(n)])
    elapsed = time.perf_counter() - t0
    proc1 = time.process_time()
    stats = call("/_stats")
    missing = sum(1 for p in out if p is None or not getattr(p, "answer", None))
    if missing:
        raise SystemExit(f"dspy.Parallel: {missing} of {n} predictions failed")
    print(json.dumps({"n": n, "threads": threads, "lms": k, "start": start, "elapsed_s": round(elapsed, 4),
                      "tasks_per_s": n / elapsed, "max_in_flight": int(stats["max_in_flight"]),
                      "cpu_ms_per_call": round((proc1 - proc0) * 1000 / n, 4)}), flush=True)


def _cpu_row(scenario: str, label: str, ours: float, ref: float, ref_label: str) -> Row:
    ratio = ours / ref if ref else None
    return Row(scenario, label, ours, "ms", ref, ref_label, ratio, "<= 2x", None if ratio is None else ratio <= 2.0)


def _slim(runs: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Runs without their in-flight series (those go to a file)."""
    return {k: [{kk: vv for kk, vv in r.items() if kk != "series"} for r in v] for k, v in runs.items()}


# -- inflight ------------------------------------------------------------------------------------
INFLIGHT_KINDS = {
    "single_async": "single tasks, async path (200 threads)",
    "single_threads": "single tasks, DSPEX_ASYNC_MODULES=0",
    "map_async": f"Client.map async path (chunk {MAP_CHUNK}, loop cap {MAP_CAP})",
    "map_threads": f"Client.map, DSPEX_ASYNC_MODULES=0 ({MAP_POOL}-thread pool)",
    "parallel": f"dspy.Parallel({MAP_CAP}) in-process, memoized DSPy",
}


def warm_pair(mock: Any, pairs: Any, map_items: int, chunk: int | None) -> None:
    """Wait for the mock and both workers, pause the workers, and warm each with single tasks and a map (untimed)."""
    mock.wait_ready()
    for w, _ in pairs:
        w.wait_ready()
        w.pause()
    for tag, (w, c) in enumerate(pairs, start=1):
        single_run(w, c, mock, THREADS, 10**8 + tag * 10**6)
        map_run(w, c, mock, [question(10**8 + tag * 10**6 + 5000 + i) for i in range(map_items)], chunk)


def scenario_inflight(ctx: Context) -> Outcome:
    n_single = 400 if ctx.quick else 1000
    n_map = 500 if ctx.quick else 1000
    lat_s = LATENCY_MS / 1000.0
    mock = MockLMProcess(latency_ms=LATENCY_MS, log_dir=ctx.log_dir)
    aw = live_worker(ctx, mock, "live-async", queue="live.async", cap=MAP_CAP)
    tw = live_worker(ctx, mock, "live-threads", queue="live.threads", async_modules=False)
    ca, ct = queue_client(ctx, "live.async"), queue_client(ctx, "live.threads")
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in INFLIGHT_KINDS}
    try:
        warm_pair(mock, ((aw, ca), (tw, ct)), 300, MAP_CHUNK)

        def run(kind: str, r: int) -> None:
            base = (r + 1) * 10**5
            if kind == "single_async":
                out = single_run(aw, ca, mock, n_single, base)
            elif kind == "single_threads":
                out = single_run(tw, ct, mock, n_single, base + 20000)
            elif kind == "map_async":
                out = map_run(aw, ca, mock, [question(base + 40000 + i) for i in range(n_map)], MAP_CHUNK)
            elif kind == "map_threads":
                out = map_run(tw, ct, mock, [question(base + 60000 + i) for i in range(n_map)], MAP_CHUNK)
            else:
                out = parallel_run(ctx, mock, n_map, MAP_CAP, base + 80000)
            runs[kind].append(out)
            print(f"  inflight round {r + 1}/{ctx.rounds} {kind:14s}: {out['tasks_per_s']:7.1f}/s, max in flight "
                  f"{out['max_in_flight']:4d}, CPU {out['cpu_ms_per_call']:.2f} ms/call", flush=True)

        for r in range(ctx.rounds):
            order = list(INFLIGHT_KINDS)
            for kind in (order if r % 2 == 0 else order[::-1]):
                run(kind, r)
    finally:
        ca.close()
        ct.close()
        aw.stop()
        tw.stop()
        mock.stop()
    m = {k: median_run(v) for k, v in runs.items()}
    sa, st, ma, mt, par = (m[k] for k in INFLIGHT_KINDS)

    def bound(run: dict[str, Any]) -> float:
        return float(run["max_in_flight"]) / lat_s

    rows = [
        Row("inflight", f"single tasks, async path: calls in flight (max), HTTP mock {LATENCY_MS:.0f} ms",
            sa["max_in_flight"], "calls", float(THREADS), "threads"),
        Row("inflight", "  tasks/s vs in flight / latency", sa["tasks_per_s"], "tasks/s", bound(sa),
            "latency bound", sa["tasks_per_s"] / bound(sa)),
        Row("inflight", "single tasks, DSPEX_ASYNC_MODULES=0: calls in flight (max)", st["max_in_flight"], "calls",
            float(THREADS), "threads"),
        Row("inflight", "  tasks/s vs in flight / latency", st["tasks_per_s"], "tasks/s", bound(st),
            "latency bound", st["tasks_per_s"] / bound(st)),
        Row("inflight", f"{INFLIGHT_KINDS['map_async']}: calls in flight (max)", ma["max_in_flight"], "calls",
            float(MAP_CAP), "loop cap", None, f">= {MAP_CAP}", ma["max_in_flight"] >= MAP_CAP),
        ratio_row("inflight", "  items/s vs in flight / latency", ma["tasks_per_s"], bound(ma), "latency bound",
                  "predictions/s", 0.7, ">= 0.7"),
        Row("inflight", f"{INFLIGHT_KINDS['map_threads']}: calls in flight (max)", mt["max_in_flight"], "calls",
            float(MAP_POOL), "map pool"),
        Row("inflight", "  items/s vs in flight / latency", mt["tasks_per_s"], "predictions/s", bound(mt),
            "latency bound", mt["tasks_per_s"] / bound(mt)),
        Row("inflight", "map async path vs map thread path (before)", ma["tasks_per_s"], "predictions/s",
            mt["tasks_per_s"], "map, ASYNC=0", ma["tasks_per_s"] / mt["tasks_per_s"]),
        Row("inflight", f"{INFLIGHT_KINDS['parallel']}: calls in flight (max)", par["max_in_flight"], "calls",
            float(MAP_CAP), "threads"),
        ratio_row("inflight", f"map async path vs dspy.Parallel({MAP_CAP}) in-process", ma["tasks_per_s"],
                  par["tasks_per_s"], f"Parallel({MAP_CAP})", "predictions/s", 0.8, ">= 0.8"),
        Row("inflight", f"CPU per LM call: dspy.Parallel({MAP_CAP}) in-process, memoized", par["cpu_ms_per_call"],
            "ms"),
    ]
    ref = par["cpu_ms_per_call"]
    for kind in ("single_async", "single_threads", "map_async", "map_threads"):
        rows.append(_cpu_row("inflight", f"CPU per LM call, worker: {INFLIGHT_KINDS[kind]}", m[kind]["cpu_ms_per_call"],
                             ref, "Parallel memo"))
    series = {k: v[-1]["series"] for k, v in runs.items()}  # the last round of each kind
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    series_path = ctx.log_dir / "live_inflight_series.json"
    series_path.write_text(json.dumps({"series": series, "medians": _slim({k: [v] for k, v in m.items()})}))
    png = plot_inflight(series, m, lat_s, copy_to_docs=not ctx.quick)
    per_round = {k: [round(r["tasks_per_s"], 1) for r in v] for k, v in runs.items()}
    return Outcome(rows, {"n_single": n_single, "n_map": n_map, "latency_ms": LATENCY_MS, "threads": THREADS,
                          "map_chunk": MAP_CHUNK, "loop_cap": MAP_CAP, "per_round_per_s": per_round,
                          "runs": _slim(runs), "series_file": str(series_path), "png": str(png) if png else None})


def plot_inflight(series: dict[str, list[tuple[float, int]]], medians: dict[str, dict[str, Any]], lat_s: float,
                  *, copy_to_docs: bool) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  matplotlib not installed: no plot", flush=True)
        return None
    styles = {"map_async": ("tab:blue", "-"), "map_threads": ("tab:orange", "-"), "single_async": ("tab:green", "--"),
              "single_threads": ("tab:olive", ":"), "parallel": ("tab:purple", "-.")}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=110)
    for kind, points in series.items():
        if not points:
            continue
        color, line = styles[kind]
        left.plot([t for t, _ in points], [n for _, n in points], line, color=color, lw=1.4,
                  label=f"{INFLIGHT_KINDS[kind]}: {medians[kind]['n']} calls")
    left.set_xlabel("seconds since start (one run each)")
    left.set_ylabel("LM calls in flight at the mock")
    left.set_title(f"Calls in flight, HTTP mock LM {lat_s * 1000:.0f} ms, 1 worker process")
    left.set_ylim(bottom=0)
    left.grid(alpha=0.3)
    left.legend(fontsize=7, loc="upper right")
    top = max(r["max_in_flight"] for r in medians.values()) * 1.1
    right.plot([0, top], [0, top / lat_s], "--", color="grey", label=f"latency bound (in flight / {lat_s:g} s)")
    for kind, r in medians.items():
        color, _ = styles[kind]
        right.scatter([r["max_in_flight"]], [r["tasks_per_s"]], color=color, s=40, label=INFLIGHT_KINDS[kind], zorder=3)
        offset = {"single_threads": (6, 4), "parallel": (-125, 8), "map_async": (-125, -14)}.get(kind, (6, -12))
        right.annotate(f"{r['tasks_per_s']:.0f}/s, {r['cpu_ms_per_call']:.1f} ms CPU/call",
                       (r["max_in_flight"], r["tasks_per_s"]), textcoords="offset points", xytext=offset, fontsize=7)
    right.set_xlabel("max calls in flight")
    right.set_ylabel("calls/s (median run)")
    right.set_title("Throughput vs calls in flight")
    right.set_xlim(0, top)
    right.set_ylim(bottom=0)
    right.grid(alpha=0.3)
    right.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / "live_inflight.png"
    fig.savefig(out)
    plt.close(fig)
    if copy_to_docs:
        DOCS_PNG.parent.mkdir(parents=True, exist_ok=True)
        DOCS_PNG.write_bytes(out.read_bytes())
    return out


# -- ttft --------------------------------------------------------------------------------------------
FIRST_CHUNK_MS = 200.0
CHUNK_MS = 20.0


def stream_one(client: Any, i: int) -> dict[str, float]:
    """One streamed job, followed to its end: when it was submitted, its first token arrived, the worker wrote it."""
    t0 = time.time()
    job = client.submit(SIGNATURE, question(i), session="bench-ttft", stream=True)
    first = token_ts = None
    for event in job.events(timeout=60):
        if event["type"] == "token" and event.get("chunk") and first is None:
            first, token_ts = time.time(), float(event["ts"])
        elif event["type"] == "error":
            raise RuntimeError(f"streamed job failed: {event!r:.500}")
    end = time.time()
    del job
    if first is None or token_ts is None:
        raise RuntimeError(f"streamed job {i}: no token event")
    return {"t0": t0, "first": first, "token_ts": token_ts, "end": end}


def direct_stream_ms(mock: MockLMProcess, n: int) -> list[float]:
    """The same streamed prediction in this process: ``dspy.streamify`` of ``dspy.Predict`` (as the worker runs it,
    ``is_async_program``), start to first ``StreamResponse``, minus the first-chunk delay."""
    import asyncio

    import dspy

    import signatures

    lm = dspy.LM("openai/mock", api_base=mock.api_base, api_key="sk-bench", cache=False, num_retries=0)
    predict = dspy.Predict(signatures.qa.to_dspy())
    listener = dspy.streaming.StreamListener(signature_field_name="answer", allow_reuse=True)
    program = dspy.streamify(predict, stream_listeners=[listener], is_async_program=True, async_streaming=True)

    async def one(i: int) -> float:
        t0 = time.perf_counter()
        first = None
        async for value in program(**question(i)):
            if first is None and isinstance(value, dspy.streaming.StreamResponse) and value.chunk:
                first = time.perf_counter()
        if first is None:
            raise RuntimeError("direct dspy.streamify: no chunk streamed")
        return (first - t0) * 1000 - FIRST_CHUNK_MS

    async def many() -> list[float]:
        for i in range(3):
            await one(10**8 + i)  # warm-up
        return [await one(10**9 + i) for i in range(n)]

    with dspy.context(lm=lm):
        return asyncio.run(many())


def scenario_ttft(ctx: Context) -> Outcome:
    from benchmarks import bench_suite
    from dspex_tasks.client import Client

    n = 30 if ctx.quick else 100
    mock = MockLMProcess(latency_ms=FIRST_CHUNK_MS, log_dir=ctx.log_dir)
    worker = WorkerProcess("workers.app", redis_url=ctx.url, queues="dspex.predict", concurrency=16,
                           log_dir=ctx.log_dir, name="live-ttft", env=http_env(ctx, mock, 16))
    client = Client(settings=client_settings(ctx))
    try:
        mock.wait_ready()
        knobs(mock, chunk_latency_ms=CHUNK_MS, stream_chunk_chars=0)
        worker.wait_ready()
        for i in range(5):  # warm-up, untimed
            stream_one(client, 10**7 + i)
        mock.reset_stats()
        samples = [stream_one(client, i) for i in range(n)]
        log = [e for e in mock._request("/_log") if e.get("stream")]
        direct = direct_stream_ms(mock, n)
    finally:
        client.close()
        worker.stop()
        mock.stop()
    ours = [(s["first"] - s["t0"]) * 1000 - FIRST_CHUNK_MS for s in samples]
    delivery = [(s["first"] - s["token_ts"]) * 1000 for s in samples]
    split = len(log) == n  # one LM request per job, in order (one job at a time)
    pre_lm = [(e["t"] - s["t0"]) * 1000 for s, e in zip(samples, log, strict=False)] if split else []
    in_dspy = [(s["token_ts"] - e["t"]) * 1000 - FIRST_CHUNK_MS for s, e in zip(samples, log, strict=False)] \
        if split else []
    p50, p99 = statistics.median(ours), pct(ours, 99)
    d50, d99 = statistics.median(direct), pct(direct, 99)
    rows = [
        Row("ttft", f"streamed: submit -> 1st token at client, minus {FIRST_CHUNK_MS:.0f} ms first chunk, p50",
            p50, "ms", d50, "direct dspy.streamify", p50 / d50 if d50 > 0 else None, "<= 10 ms", p50 <= 10.0),
        Row("ttft", "  p99", p99, "ms", d99, "direct dspy.streamify", p99 / d99 if d99 > 0 else None),
        Row("ttft", "  queue share of p50 (dspex p50 - direct p50)", p50 - d50, "ms", None, "", None, "<= 10 ms",
            p50 - d50 <= 10.0),
    ]
    if split:
        rows += [
            Row("ttft", "  of which submit -> LM request at the mock, p50", statistics.median(pre_lm), "ms"),
            Row("ttft", f"  of which mock's 1st chunk -> worker writes 1st token, p50 ({CHUNK_MS:.0f} ms/chunk)",
                statistics.median(in_dspy), "ms"),
        ]
    rows.append(Row("ttft", "  of which worker writes token -> client has it, p50", statistics.median(delivery), "ms",
                    None, "", None, "", None))
    rows.append(Row("ttft", "    (same, p99)", pct(delivery, 99), "ms"))
    lat = bench_suite.scenario_latency(ctx)  # the unstreamed path, as the `latency` scenario measures it
    u_ours, u_direct = lat.details["ours_ms"], lat.details["direct_ms"]
    u50, u99 = statistics.median(u_ours), pct(u_ours, 99)
    v50, v99 = statistics.median(u_direct), pct(u_direct, 99)
    lat_ms = lat.details["latency_ms"]
    rows += [
        Row("ttft", f"unstreamed: submit().get() minus {lat_ms:.0f} ms mock, p50", u50, "ms", v50,
            "direct dspy.Predict", u50 / v50 if v50 > 0 else None),
        Row("ttft", f"unstreamed: submit().get() minus {lat_ms:.0f} ms mock, p99", u99, "ms", v99,
            "direct dspy.Predict", u99 / v99 if v99 > 0 else None, "<= 10 ms", u99 <= 10.0),
        Row("ttft", "  queue share of p99 (dspex p99 - direct p99)", u99 - v99, "ms"),
    ]
    return Outcome(rows, {
        "n": n, "first_chunk_ms": FIRST_CHUNK_MS, "chunk_ms": CHUNK_MS, "ours_ms": [round(x, 3) for x in ours],
        "direct_ms": [round(x, 3) for x in direct], "delivery_ms": [round(x, 3) for x in delivery],
        "pre_lm_ms": [round(x, 3) for x in pre_lm], "mock_first_chunk_to_token_ms": [round(x, 3) for x in in_dspy],
        "unstreamed": {k: v for k, v in lat.details.items() if k != "raw_http_ms"}})


# -- livemem ------------------------------------------------------------------------------------------
WAVE = 200


def wait_final(redis_client: Any, result_keys: list[Any], *, timeout_s: float, poll_s: float = 0.05
               ) -> list[dict[str, Any]]:
    """Until every result is final (a streamed job's key holds its ``PROGRESS`` state first); the results."""
    deadline = time.monotonic() + timeout_s
    done: dict[int, dict[str, Any]] = {}
    while len(done) < len(result_keys):
        todo = [i for i in range(len(result_keys)) if i not in done]
        for i, raw in zip(todo, redis_client.mget([result_keys[i] for i in todo]), strict=True):
            if raw is not None:
                value = json.loads(raw)
                if value.get("status") in ("SUCCESS", "FAILURE", "REVOKED"):
                    done[i] = value
        if len(done) < len(result_keys):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(result_keys) - len(done)} of {len(result_keys)} results not final")
            time.sleep(poll_s)
    return [done[i] for i in range(len(result_keys))]


def held_rss(worker: WorkerProcess, mock: MockLMProcess, start: Any, want: int, timeout_s: float = 30.0
             ) -> tuple[float, int]:
    """Call ``start()`` (which puts ``want`` calls in flight), wait until the mock holds them; max RSS then."""
    start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and int(mock.stats()["in_flight"]) < want:
        time.sleep(0.05)
    best, held = 0.0, 0
    for _ in range(6):
        held = max(held, int(mock.stats()["in_flight"]))
        best = max(best, rss_mb(worker.pid))
        time.sleep(0.2)
    return best, held


def idle_rss(worker: WorkerProcess) -> float:
    values = []
    for _ in range(5):
        values.append(rss_mb(worker.pid))
        time.sleep(0.2)
    return statistics.median(values)


def scenario_livemem(ctx: Context) -> Outcome:
    from dspex_tasks import keys
    from dspex_tasks.client import Client

    n_jobs = 2000 if ctx.quick else 10_000
    n_held, held_latency_ms = 500, 5000.0
    mock = MockLMProcess(latency_ms=0.0, log_dir=ctx.log_dir)
    client = Client(settings=client_settings(ctx))
    key_for = client.app.backend.get_key_for_task
    details: dict[str, Any] = {"n_jobs": n_jobs, "wave": WAVE, "stream_chunk_chars": 4}
    try:
        mock.wait_ready()
        knobs(mock, chunk_latency_ms=0, stream_chunk_chars=4)
        # 1. RSS over many streamed jobs
        worker = WorkerProcess("workers.app", redis_url=ctx.url, queues="dspex.predict", concurrency=THREADS,
                               log_dir=ctx.log_dir, name="live-mem", env=http_env(ctx, mock, THREADS))
        worker.wait_ready()
        rss_ready = rss_mb(worker.pid)

        def wave(offset: int) -> list[str]:
            ids = [str(client.submit(SIGNATURE, question(offset + i), session="bench-mem", stream=True).id)
                   for i in range(WAVE)]
            results = wait_final(client.redis, [key_for(i) for i in ids], timeout_s=600)
            failed = [r for r in results if r.get("status") != "SUCCESS"]
            if failed:
                raise RuntimeError(f"{len(failed)} of {WAVE} streamed jobs failed, e.g. {failed[0]!r:.800}")
            return ids

        wave(10**8)  # warm-up, untimed
        time.sleep(1.0)
        before = idle_rss(worker)
        redis0 = int(client.redis.info("memory")["used_memory"])
        cpu0 = cpu_s(worker.pid)
        t0 = time.perf_counter()
        trend: list[tuple[int, float]] = [(0, before)]
        ids: list[str] = []
        for k in range(n_jobs // WAVE):
            ids = wave(k * WAVE)
            trend.append(((k + 1) * WAVE, round(rss_mb(worker.pid), 2)))
        elapsed = time.perf_counter() - t0
        cpu1 = cpu_s(worker.pid)
        time.sleep(1.0)
        after = idle_rss(worker)
        redis1 = int(client.redis.info("memory")["used_memory"])
        tokens = sum(1 for _, f in client.redis.xrange(keys.job_events(ctx.namespace, ids[-1]))
                     if json.loads(f[b"e"])["type"] == "token")
        worker.stop()
        half = [p for p in trend if p[0] >= n_jobs // 2]
        slope = _slope(half) * 1000 if len(half) >= 3 else float("nan")
        details.update({"rss_ready_mb": round(rss_ready, 2), "rss_before_mb": round(before, 2),
                        "rss_after_mb": round(after, 2), "rss_trend": trend, "jobs_per_s": round(n_jobs / elapsed, 1),
                        "cpu_ms_per_job": round((cpu1 - cpu0) * 1000 / n_jobs, 3),
                        "tokens_in_last_job": tokens, "redis_used_memory_growth_mb": round((redis1 - redis0) / 2**20, 2),
                        "second_half_slope_mb_per_1000": round(slope, 3)})
        print(f"  livemem streamed: RSS {before:.1f} -> {after:.1f} MB over {n_jobs} jobs "
              f"({n_jobs / elapsed:.0f} jobs/s, {tokens} token events in the last job)", flush=True)

        # 2. memory per call held in flight: the async path (map items), then the thread path (single tasks)
        held: dict[str, dict[str, float]] = {}
        for kind, async_modules in (("async", True), ("threads", False)):
            knobs(mock, latency_ms=0)
            w = live_worker(ctx, mock, f"live-held-{kind}", queue=f"live.held.{kind}", async_modules=async_modules)
            c = queue_client(ctx, f"live.held.{kind}")
            try:
                w.wait_ready()
                c.map(SIGNATURE, [question(10**8 + i) for i in range(20)], session="bench-mem", chunk_size=20)
                c.submit(SIGNATURE, question(10**8 + 99), session="bench-mem").get(timeout=30)
                time.sleep(1.0)
                idle = idle_rss(w)
                knobs(mock, latency_ms=held_latency_ms)
                mock.reset_stats()
                if async_modules:
                    want = n_held
                    thread, box = _in_background(c.map, SIGNATURE, [question(2 * 10**8 + i) for i in range(want)],
                                                 session="bench-mem", chunk_size=want, timeout=120)
                    peak, in_flight = held_rss(w, mock, thread.start, want)
                    thread.join(150)
                    if "error" in box or "result" not in box:
                        raise RuntimeError(f"held map failed: {box.get('error')!r}")
                else:
                    want = THREADS
                    jobs: list[Any] = []
                    peak, in_flight = held_rss(w, mock, functools.partial(_submit_many, c, jobs, want), want)
                    for job in jobs:
                        job.get(timeout=120)
                    jobs.clear()
                held[kind] = {"idle_mb": round(idle, 2), "held_mb": round(peak, 2), "in_flight": in_flight,
                              "kb_per_call": round((peak - idle) * 1024 / max(in_flight, 1), 1)}
                print(f"  livemem held ({kind}): {in_flight} calls in flight, RSS {idle:.1f} -> {peak:.1f} MB, "
                      f"{held[kind]['kb_per_call']:.1f} KB per call", flush=True)
            finally:
                c.close()
                w.stop()
        details["held"] = held
    finally:
        client.close()
        mock.stop()
    b, a = details["rss_before_mb"], details["rss_after_mb"]
    growth = (a - b) / (n_jobs / 1000)
    slope = details["second_half_slope_mb_per_1000"]
    rows = [
        Row("livemem", f"worker RSS before {n_jobs:,} streamed jobs (after {WAVE} warm-up)", b, "MB"),
        Row("livemem", f"worker RSS after {n_jobs:,} streamed jobs (waves of {WAVE}, 0 ms mock, 4-char chunks)",
            a, "MB"),
        Row("livemem", "  RSS growth per 1,000 streamed jobs (after - before)", growth, "MB", None, "", None,
            "bounded (report)", None),
        Row("livemem", "  RSS growth per 1,000 jobs, 2nd half (least-squares slope)", slope, "MB", None, "", None,
            "<= 0.5 MB", slope <= 0.5 if slope == slope else None),
        Row("livemem", "  streamed jobs/s (1 proc x 200 threads, 0 ms mock)", details["jobs_per_s"], "tasks/s"),
        Row("livemem", "  worker CPU per streamed job", details["cpu_ms_per_job"], "ms"),
        Row("livemem", "  Redis used_memory growth (event streams kept DSPEX_STREAM_TTL_S)",
            details["redis_used_memory_growth_mb"], "MB"),
    ]
    for kind, label in (("async", f"map async path ({n_held} items held at {held_latency_ms / 1000:g} s)"),
                        ("threads", f"thread path, DSPEX_ASYNC_MODULES=0 ({THREADS} single tasks held)")):
        h = held.get(kind)
        if h:
            rows.append(Row("livemem", f"memory per in-flight call: {label}", h["kb_per_call"], "KB", None,
                            f"{h['in_flight']} in flight", None))
    return Outcome(rows, details)


def _in_background(func: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """A (not yet started) daemon thread running ``func(*args, **kwargs)`` into ``box["result"]`` or ``box["error"]``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = func(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            box["error"] = exc

    return threading.Thread(target=target, name="bench-background", daemon=True), box


def _submit_many(client: Any, jobs: list[Any], n: int) -> None:
    jobs.extend(client.submit(SIGNATURE, question(3 * 10**8 + i), session="bench-mem") for i in range(n))


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (x, y) points (MB per job)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


# -- mapio -----------------------------------------------------------------------------------------
def scenario_mapio(ctx: Context) -> Outcome:
    n = 400 if ctx.quick else 1000
    lat_s = LATENCY_MS / 1000.0
    mock = MockLMProcess(latency_ms=LATENCY_MS, log_dir=ctx.log_dir)
    aw = live_worker(ctx, mock, "mapio-async", queue="mapio.async", cap=THREADS)
    tw = live_worker(ctx, mock, "mapio-threads", queue="mapio.threads", async_modules=False)
    ca, ct = queue_client(ctx, "mapio.async"), queue_client(ctx, "mapio.threads")
    runs: dict[str, list[dict[str, Any]]] = {"single_async": [], "map_async": [], "single_threads": [],
                                             "map_threads": []}
    try:
        warm_pair(mock, ((aw, ca), (tw, ct)), THREADS, None)
        for r in range(ctx.rounds):
            base = (r + 1) * 10**5
            plan = [("single_async", aw, ca), ("map_async", aw, ca), ("single_threads", tw, ct), ("map_threads", tw, ct)]
            for i, (kind, w, c) in enumerate(plan if r % 2 == 0 else plan[::-1]):
                if kind.startswith("single"):
                    out = single_run(w, c, mock, n, base + i * 10000)
                else:
                    out = map_run(w, c, mock, [question(base + i * 10000 + j) for j in range(n)], None)
                runs[kind].append(out)
                print(f"  mapio round {r + 1}/{ctx.rounds} {kind:14s}: {out['tasks_per_s']:7.1f}/s, max in flight "
                      f"{out['max_in_flight']:4d}, CPU {out['cpu_ms_per_call']:.2f} ms/call", flush=True)
    finally:
        ca.close()
        ct.close()
        aw.stop()
        tw.stop()
        mock.stop()
    m = {k: median_run(v) for k, v in runs.items()}
    sa, ma, st, mt = m["single_async"], m["map_async"], m["single_threads"], m["map_threads"]
    chunk = ma["chunk_size"]
    rows = [
        Row("mapio", f"single tasks (1 proc x {THREADS} threads, HTTP mock {LATENCY_MS:.0f} ms)", sa["tasks_per_s"],
            "tasks/s", THREADS / lat_s, "latency bound"),
        ratio_row("mapio", f"Client.map, chunk {chunk}, async path (loop cap {THREADS}) vs single tasks",
                  ma["tasks_per_s"], sa["tasks_per_s"], "single tasks", "predictions/s", 1.0, ">= 1.0 (0.53 before)"),
        Row("mapio", "  calls in flight (max): map / single tasks", ma["max_in_flight"], "calls",
            float(sa["max_in_flight"]), "single tasks"),
        Row("mapio", "single tasks, DSPEX_ASYNC_MODULES=0", st["tasks_per_s"], "tasks/s", THREADS / lat_s,
            "latency bound"),
        Row("mapio", f"Client.map, chunk {chunk}, DSPEX_ASYNC_MODULES=0 vs single tasks (before)", mt["tasks_per_s"],
            "predictions/s", st["tasks_per_s"], "single, ASYNC=0", mt["tasks_per_s"] / st["tasks_per_s"]),
        Row("mapio", "  calls in flight (max): map / single tasks", mt["max_in_flight"], "calls",
            float(st["max_in_flight"]), "single, ASYNC=0"),
        Row("mapio", "map async path vs map thread path", ma["tasks_per_s"], "predictions/s", mt["tasks_per_s"],
            "map, ASYNC=0", ma["tasks_per_s"] / mt["tasks_per_s"]),
    ]
    for kind, label in (("map_async", "map, async path"), ("single_async", "single tasks, async path"),
                        ("map_threads", "map, ASYNC=0"), ("single_threads", "single tasks, ASYNC=0")):
        rows.append(Row("mapio", f"worker CPU per LM call: {label}", m[kind]["cpu_ms_per_call"], "ms"))
    per_round = {k: [round(r["tasks_per_s"], 1) for r in v] for k, v in runs.items()}
    return Outcome(rows, {"n": n, "latency_ms": LATENCY_MS, "threads": THREADS, "chunk_size": chunk,
                          "per_round_per_s": per_round, "runs": _slim(runs)})


# -- events ------------------------------------------------------------------------------------------------
def scenario_events(ctx: Context) -> Outcome:
    """What Celery's task events (Flower's view) cost a worker: the same single tasks at 0 ms mock latency (CPU
    bound, where the per-task cost shows) on a worker with events (batched every 100 ms) and one with
    ``DSPEX_TASK_EVENTS=0``, alternating, the idle one paused."""
    n = 600 if ctx.quick else 2000
    mock = MockLMProcess(latency_ms=0.0, log_dir=ctx.log_dir)
    on = live_worker(ctx, mock, "events-on", queue="events.on")
    off = live_worker(ctx, mock, "events-off", queue="events.off", DSPEX_TASK_EVENTS="0")
    con, coff = queue_client(ctx, "events.on"), queue_client(ctx, "events.off")
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    try:
        mock.wait_ready()
        for w, c, tag in ((on, con, 1), (off, coff, 2)):
            w.wait_ready()
            w.pause()
            single_run(w, c, mock, THREADS, 10**8 + tag * 10**6)  # warm-up, untimed
        for r in range(ctx.rounds):
            plan = [("on", on, con), ("off", off, coff)]
            for i, (kind, w, c) in enumerate(plan if r % 2 == 0 else plan[::-1]):
                out = single_run(w, c, mock, n, (r + 1) * 10**5 + i * 10**4)
                runs[kind].append(out)
                print(f"  events round {r + 1}/{ctx.rounds} {kind:3s}: {out['tasks_per_s']:7.1f}/s, "
                      f"CPU {out['cpu_ms_per_call']:.2f} ms/task", flush=True)
    finally:
        con.close()
        coff.close()
        on.stop()
        off.stop()
        mock.stop()
    m = {k: median_run(v) for k, v in runs.items()}
    rows = [
        Row("events", "single tasks/s without task events vs with them (0 ms mock, 1 proc x 200 threads)",
            m["off"]["tasks_per_s"], "tasks/s", m["on"]["tasks_per_s"], "with events",
            m["off"]["tasks_per_s"] / m["on"]["tasks_per_s"], "events cost < 18-20% (before batching)"),
        Row("events", "worker CPU per task: with events / without", m["on"]["cpu_ms_per_call"], "ms",
            m["off"]["cpu_ms_per_call"], "without events", m["on"]["cpu_ms_per_call"] / m["off"]["cpu_ms_per_call"]),
    ]
    per_round = {k: [round(r["tasks_per_s"], 1) for r in v] for k, v in runs.items()}
    return Outcome(rows, {"n": n, "threads": THREADS, "per_round_per_s": per_round, "runs": _slim(runs)})


# -- profile (standalone) ----------------------------------------------------------------------------------
#: Owner of a sample: the innermost frame from one of these (a stdlib frame goes to its nearest caller).
PACKAGES = (
    ("dspex_tasks/", "dspex code"), ("dspy/", "DSPy"), ("litellm/", "DSPy"), ("lm15/", "DSPy"),
    ("celery/", "Celery"), ("kombu/", "kombu"), ("billiard/", "Celery"), ("vine/", "Celery"), ("amqp/", "kombu"),
    ("redis/", "redis-py"), ("httpx/", "HTTP client"), ("httpcore/", "HTTP client"), ("h11/", "HTTP client"),
    ("anyio/", "HTTP client"), ("pydantic", "pydantic"), ("jsonschema", "jsonschema"), ("json_repair/", "DSPy"),
    ("orjson", "json"), ("opentelemetry", "otel"), ("prometheus_client/", "prometheus"),
)


def _frame_file(frame: str) -> str:
    """``func (path/file.py:12)`` -> ``path/file.py``."""
    inner = frame.rsplit(" (", 1)[-1].rstrip(")")
    return inner.rsplit(":", 1)[0]


def _owner(files: list[str]) -> str:
    for f in reversed(files):
        for prefix, name in PACKAGES:
            if prefix in f:
                return name
    return "stdlib only"


def _thread_name(head: str) -> str:
    """``thread (0x7f..): MainThread`` -> ``MainThread``."""
    return head.split("):", 1)[-1].strip() if "):" in head else head


def classify(stack: list[str]) -> tuple[str, str, str]:
    """(group, detail, owner) of one sample: which thread did what, and whose code the CPU was in."""
    thread = _thread_name(stack[0])
    # the loop's own entry (``process_loop``'s thread function) is asyncio's time, not dspex code's
    files = [_frame_file(f) for f in stack[1:] if not f.startswith("process_loop.<locals>.serve ")]
    owner = _owner(files)
    has_dspy = any("dspy/" in f or "lm15/" in f or "litellm/" in f for f in files)
    has_runner = any("dspex_tasks/worker/runner.py" in f or "dspex_tasks/lm/" in f for f in files)
    if thread == "MainThread":
        group = "Celery consumer thread (MainThread): fetch, decode, dispatch, ack"
        detail = {"redis-py": "Redis I/O (fetch script, ack pipeline, events)", "dspex code": "dspex fetch/ack code",
                  "stdlib only": "epoll wait / stdlib"}.get(owner, "kombu/Celery message handling")
    elif thread.startswith("ThreadPoolExecutor"):  # Celery's threads pool
        if has_dspy:
            group, detail = "prediction: DSPy", "in the task thread (thread path)"
        elif has_runner:
            group, detail = "prediction: dspex runner and governed LM", "in the task thread (thread path)"
        else:
            group = "Celery task thread: trace, result store, ack (and dspex task code)"
            detail = {"redis-py": "Redis I/O (result store, PROGRESS)",
                      "dspex code": "dspex task code (options, control, hand-off to the loop, result)",
                      "stdlib only": "thread wake-up / hand-off"}.get(owner, "Celery trace, ack, saferepr, signals")
    elif thread == "dspex-live-loop":
        if has_dspy:
            group, detail = "prediction: DSPy", "on the event loop (async path)"
        elif owner == "dspex code":
            group, detail = "prediction: dspex runner and governed LM", "on the event loop (async path)"
        else:
            group, detail = "event loop plumbing (asyncio select, wake-ups, transports)", owner
    elif thread.startswith(("asyncio_", "dspex-loop-io")):  # the loop's default executor (asyncio.to_thread)
        group = "event loop's executor threads (asyncio.to_thread)"
        detail = "DSPy (cost estimate, routing)" if has_dspy else "thread wake-up / future hand-off"
    elif thread.startswith("dspex-"):
        group, detail = "dspex background threads", thread
    else:
        group, detail = "other threads", thread
    return group, detail, owner


def breakdown(raw: str) -> dict[str, Any]:
    """Parse py-spy's ``-f raw --threads`` output: samples by group (and detail), and by owner."""
    groups: collections.Counter[str] = collections.Counter()
    details: collections.Counter[tuple[str, str]] = collections.Counter()
    owners: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack_text, _, count_text = line.strip().rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        stack = stack_text.split(";")
        group, detail, owner = classify(stack)
        groups[group] += count
        details[(group, detail)] += count
        owners[owner] += count
        leaf = stack[-1]
        leaves[f"{leaf.split(' (')[0]} ({_frame_file(leaf)})"] += count
        total += count
    return {"samples": total, "groups": groups.most_common(),
            "details": [(g, d, n) for (g, d), n in details.most_common()], "owners": owners.most_common(),
            "top_leaves": leaves.most_common(25)}


def print_breakdown(doc: dict[str, Any]) -> None:
    total = doc["samples"] or 1
    print("\n| where (thread: activity) | detail | share |\n|---|---|---:|")
    for group, n in doc["groups"]:
        print(f"| **{group}** | | **{n / total:.1%}** |")
        for g, d, m in doc["details"]:
            if g == group and m / total >= 0.005:
                print(f"| | {d} | {m / total:.1%} |")
    print("\n| owner (innermost non-stdlib frame) | share |\n|---|---:|")
    for name, n in doc["owners"]:
        print(f"| {name} | {n / total:.1%} |")
    print("\ntop leaf frames:")
    for name, n in doc["top_leaves"]:
        print(f"  {n / total:6.1%}  {name}")


def profile_main(args: argparse.Namespace) -> int:
    """A worker on single tasks (pre-enqueued, HTTP mock), profiled with py-spy while it drains the queue."""
    from benchmarks._harness import install_signal_handlers, new_log_dir
    from dspex_tasks.testing.redis_server import RedisServer

    install_signal_handlers()
    log_dir = new_log_dir()
    redis = RedisServer()
    pyspy = Path(sys.executable).with_name("py-spy")
    out = Path(args.out or log_dir / "profile.txt")
    try:
        redis.start()
        ctx = Context(redis, f"bench{uuid.uuid4().hex[:8]}", log_dir, False, 1)
        mock = MockLMProcess(latency_ms=args.latency_ms, log_dir=log_dir)
        mock.wait_ready()
        if args.stream:  # livemem's streamed workload: 4-character chunks
            knobs(mock, chunk_latency_ms=0, stream_chunk_chars=4)
        worker = live_worker(ctx, mock, "profiled", queue="live.profile", async_modules=bool(args.async_modules))
        client = queue_client(ctx, "live.profile")
        worker.wait_ready()
        worker.pause()
        single_run(worker, client, mock, THREADS, 10**8)  # warm-up

        def send(i: int) -> str:
            return str(client.submit(SIGNATURE, question(i), session="bench-live", stream=args.stream).id)

        worker.pause()
        ids = [send(i) for i in range(args.n)]
        keys = [client.app.backend.get_key_for_task(i) for i in ids]
        cpu0 = cpu_s(worker.pid)
        t0 = time.perf_counter()
        worker.resume()
        time.sleep(1.5)  # past the first latency period: steady state
        cmd = [str(pyspy), "record", "--nonblocking", "--threads", "-p", str(worker.pid), "-d", str(args.seconds),
               "-f", "raw", "-o", str(out)] + (["--gil"] if args.gil else [])
        cpu_a = cpu_s(worker.pid)
        ta = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, timeout=args.seconds + 60)
        cpu_b = cpu_s(worker.pid)
        tb = time.perf_counter()
        _, results = wait_results(client.redis, keys, timeout_s=900)
        elapsed = time.perf_counter() - t0
        cpu1 = cpu_s(worker.pid)
        client.close()
        worker.stop()
        mock.stop()
    finally:
        cleanup_all()
        redis.stop()
    doc = breakdown(out.read_text())
    doc.update({"n": args.n, "latency_ms": args.latency_ms, "async_modules": bool(args.async_modules),
                "tasks_per_s": round(args.n / elapsed, 1), "cpu_ms_per_task": round((cpu1 - cpu0) * 1000 / args.n, 3),
                "cpu_share_during_profile": round((cpu_b - cpu_a) / (tb - ta), 3), "raw": str(out),
                "failed": sum(1 for r in results if r.get("status") != "SUCCESS")})
    print(f"profile: {out} ({doc['samples']} samples; {doc['tasks_per_s']} tasks/s, "
          f"{doc['cpu_ms_per_task']} CPU ms/task, worker used {doc['cpu_share_during_profile']:.2f} cores while sampled)")
    print_breakdown(doc)
    if args.json:
        print(json.dumps(doc, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    child = sub.add_parser("parallel-child", help="internal: the in-process dspy.Parallel reference")
    child.add_argument("--api-base", required=True)
    child.add_argument("--n", type=int, required=True)
    child.add_argument("--threads", type=int, required=True)
    child.add_argument("--offset", type=int, default=0)
    prof = sub.add_parser("profile", help="py-spy breakdown of a worker's CPU on single tasks")
    prof.add_argument("--n", type=int, default=3000, help="tasks pre-enqueued (default 3000)")
    prof.add_argument("--seconds", type=int, default=8, help="py-spy record duration (default 8)")
    prof.add_argument("--latency-ms", type=float, default=LATENCY_MS)
    prof.add_argument("--async-modules", type=int, default=1, choices=(0, 1))
    prof.add_argument("--gil", type=int, default=1, choices=(0, 1),
                      help="sample only the thread holding the GIL (default 1: where the interpreter's time goes)")
    prof.add_argument("--out", default=None, help="raw py-spy output file (default: in the log directory)")
    prof.add_argument("--json", action="store_true")
    prof.add_argument("--stream", action="store_true", help="streamed jobs (stream=True), 4-character chunks")
    args = parser.parse_args(argv)
    if args.cmd == "parallel-child":
        parallel_child(args.api_base, args.n, args.threads, args.offset)
        return 0
    return profile_main(args)


if __name__ == "__main__":
    sys.exit(main())
