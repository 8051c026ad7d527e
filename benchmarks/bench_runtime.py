"""Benchmark the runtime: Celery overhead, ``Client.map`` throughput, and LM-bound I/O concurrency.

One run starts a private Redis (never a shared one), worker OS processes (``celery worker``, threads pool) and,
for ``io``, the HTTP mock LM in its own OS process, then runs the selected scenarios against that one Redis:

* ``overhead``: a bare Celery no-op task (``benchmarks/noop_app.py``, same ``celery_config``) vs the dspex ``qa``
  signature task with the in-process mock LM; one worker process each, threads pool, concurrency 16. Messages
  are enqueued while the worker is SIGSTOPped, then it is SIGCONTed and timed until the last result is stored
  (the worker's own ``date_done``), so submission cost is excluded. Rounds alternate raw/dspex; medians.
* ``map``: ``Client.map`` end to end (client validation, chunking, send, collect) against 2 worker processes with
  the in-process mock LM, vs DSPex's claimed 1,300 requests/s.
* ``io``: the HTTP mock LM at 200 ms; one dspex worker process (concurrency 200, ``openai/mock`` through LiteLLM),
  pre-enqueued like ``overhead``, vs the same calls from this process with ``dspy.Parallel(num_threads=200)``,
  once with plain DSPy and once with ``dspex_tasks.worker.dspy_patches.apply_dspy_speedups()`` applied.

Usage::

    python benchmarks/bench_runtime.py                    # full run, rich table
    python benchmarks/bench_runtime.py --quick --json     # small run, plus a JSON document at the end
    python benchmarks/bench_runtime.py --scenarios overhead,io
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before anything imports dspy / litellm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import (  # noqa: E402
    MockLMProcess,
    WorkerProcess,
    cleanup_all,
    date_done,
    install_signal_handlers,
    machine_info,
    new_log_dir,
    wait_results,
)
from dspex_tasks.testing.redis_server import RedisServer  # noqa: E402

SCENARIOS = ("overhead", "map", "io")
SIGNATURE = "qa"
DSPEX_CLAIM_RPS = 1300.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- results -----------------------------------------------------------------
@dataclass
class Row:
    scenario: str
    metric: str
    ours: float
    unit: str = ""
    reference: float | None = None
    reference_label: str = ""
    ratio: float | None = None
    aim: str = ""
    met: bool | None = None


@dataclass
class Outcome:
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    redis: RedisServer
    namespace: str
    log_dir: Path
    quick: bool
    rounds: int

    @property
    def url(self) -> str:
        return self.redis.url


def ratio_row(scenario: str, metric: str, ours: float, reference: float, ref_label: str, unit: str,
              minimum: float, aim: str) -> Row:
    ratio = ours / reference if reference else None
    return Row(scenario, metric, ours, unit, reference, ref_label, ratio, aim,
               None if ratio is None else ratio >= minimum)


# -- helpers -------------------------------------------------------------------
def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process (all its threads) from /proc; 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def question(i: int) -> dict[str, Any]:
    return {"question": f"What is fact number {i} about the history of computing, in one sentence?"}


def dspex_worker_env(ctx: Context, concurrency: int, **extra: str) -> dict[str, str]:
    return {"DSPEX_NAMESPACE": ctx.namespace, "DSPEX_LM": "mock", "DSPEX_WORKER_POOL": "threads",
            "DSPEX_WORKER_CONCURRENCY": str(concurrency), "DSPEX_SIGNATURE_MODULES": "signatures", **extra}


def client_settings(ctx: Context, **extra: Any) -> Any:
    from dspex_tasks.settings import load_settings

    return load_settings(redis_url=ctx.url, namespace=ctx.namespace, **extra)


def pre_enqueued_run(worker: WorkerProcess, send: Callable[[int], str], key_for: Callable[[str], bytes],
                     redis_client: Any, n: int, *, start: int = 0, timeout_s: float = 600.0,
                     extra_pids: dict[str, int | None] | None = None) -> dict[str, Any]:
    """Enqueue ``n`` tasks while ``worker`` is paused, resume it, time until its last result is stored.

    The worker is paused again afterwards. Returns tasks/s and CPU seconds per task of the worker (and of
    ``extra_pids``) over the timed window.
    """
    worker.pause()
    ids = [send(start + i) for i in range(n)]
    keys = [key_for(task_id) for task_id in ids]
    pids = {"worker": worker.pid, **(extra_pids or {})}
    cpu0 = {name: cpu_s(pid) for name, pid in pids.items()}
    t0 = time.time()
    worker.resume()
    seen, results = wait_results(redis_client, keys, timeout_s=timeout_s)
    cpu1 = {name: cpu_s(pid) for name, pid in pids.items()}
    worker.pause()
    failed = [r for r in results if r.get("status") != "SUCCESS"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {n} tasks failed on {worker.name}, e.g. {failed[0]!r:.800}")
    done = [d for d in (date_done(r) for r in results) if d is not None]
    end = max(done) if len(done) == len(results) else seen
    elapsed = max(end - t0, 1e-6)
    return {"n": n, "elapsed_s": round(elapsed, 4), "tasks_per_s": n / elapsed, "seen_lag_s": round(seen - end, 4),
            "cpu_ms_per_task": {k: round((cpu1[k] - cpu0[k]) * 1000 / n, 4) for k in pids}}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput (lower median for an even count)."""
    ordered = sorted(runs, key=lambda r: r["tasks_per_s"])
    return ordered[(len(ordered) - 1) // 2]


# -- scenario 1: overhead ---------------------------------------------------------
def scenario_overhead(ctx: Context) -> Outcome:
    from celery import Celery

    from benchmarks import noop_app
    from dspex_tasks.app import celery_config
    from dspex_tasks.client import Client

    n = 400 if ctx.quick else 2000
    concurrency = 16
    raw = WorkerProcess("benchmarks.noop_app", redis_url=ctx.url, queues=noop_app.QUEUE, concurrency=concurrency,
                        log_dir=ctx.log_dir, name="noop", env={"DSPEX_NAMESPACE": ctx.namespace})
    dsp = WorkerProcess("workers.app", redis_url=ctx.url, queues="dspex.predict", concurrency=concurrency,
                        log_dir=ctx.log_dir, name="dspex-overhead", env=dspex_worker_env(ctx, concurrency))
    raw_app = Celery("bench-client")
    raw_app.conf.update(celery_config(client_settings(ctx, predict_queue=noop_app.QUEUE)))
    client = Client(settings=client_settings(ctx))
    try:
        raw.wait_ready()
        raw.pause()
        dsp.wait_ready()
        dsp.pause()

        def send_raw(i: int) -> str:
            return str(raw_app.send_task(noop_app.TASK, kwargs={"i": i}, queue=noop_app.QUEUE).id)

        def send_dspex(i: int) -> str:
            return client.submit(SIGNATURE, question(i), session="bench-overhead").id

        kinds = {
            "raw": (raw, send_raw, raw_app.backend.get_key_for_task),
            "dspex": (dsp, send_dspex, client.app.backend.get_key_for_task),
        }
        redis_pid = {"redis": ctx.redis.pid}
        for worker, send, key_for in kinds.values():  # warm-up, untimed
            pre_enqueued_run(worker, send, key_for, client.redis, 200, start=10**7)
        runs: dict[str, list[dict[str, Any]]] = {"raw": [], "dspex": []}
        for r in range(ctx.rounds):
            for kind, (worker, send, key_for) in kinds.items():
                run = pre_enqueued_run(worker, send, key_for, client.redis, n, start=r * n, extra_pids=redis_pid)
                runs[kind].append(run)
                print(f"  overhead round {r + 1}/{ctx.rounds} {kind:5s}: {run['tasks_per_s']:8.1f} tasks/s "
                      f"(worker {run['cpu_ms_per_task']['worker']:.3f} CPU ms/task)", flush=True)
    finally:
        client.close()
        raw_app.close()
        dsp.stop()
        raw.stop()
    raw_m, dsp_m = median_run(runs["raw"]), median_run(runs["dspex"])
    rows = [
        Row("overhead", "raw Celery no-op (1 proc, 16 threads)", raw_m["tasks_per_s"], "tasks/s"),
        ratio_row("overhead", "dspex qa task, mock LM (1 proc, 16 threads)", dsp_m["tasks_per_s"],
                  raw_m["tasks_per_s"], "raw no-op", "tasks/s", 0.8, ">= 0.8"),
        Row("overhead", "worker CPU per task: raw no-op", raw_m["cpu_ms_per_task"]["worker"], "ms"),
        Row("overhead", "worker CPU per task: dspex qa", dsp_m["cpu_ms_per_task"]["worker"], "ms"),
    ]
    per_round = [d["tasks_per_s"] / r["tasks_per_s"] for r, d in zip(runs["raw"], runs["dspex"], strict=True)]
    return Outcome(rows, {"n": n, "concurrency": concurrency, "pool": "threads", "rounds": runs,
                          "ratio_per_round": [round(x, 3) for x in per_round]})


# -- scenario 2: map -----------------------------------------------------------------
def scenario_map(ctx: Context) -> Outcome:
    from dspex_tasks.client import Client

    n = 1000 if ctx.quick else 5000
    concurrency = 16
    workers = [WorkerProcess("workers.app", redis_url=ctx.url, queues="dspex.predict", concurrency=concurrency,
                             log_dir=ctx.log_dir, name=f"dspex-map{i}", env=dspex_worker_env(ctx, concurrency))
               for i in range(2)]
    client = Client(settings=client_settings(ctx))
    items = [question(i) for i in range(n)]
    runs: list[dict[str, Any]] = []
    try:
        for w in workers:
            w.wait_ready()
        client.map(SIGNATURE, items[:300], session="bench-map")  # warm-up, untimed
        t0 = time.perf_counter()
        for item in items:
            client.validate(SIGNATURE, item)
        validate_s = time.perf_counter() - t0
        for r in range(ctx.rounds):
            cpu0 = [cpu_s(w.pid) for w in workers]
            proc0 = time.process_time()
            t0 = time.perf_counter()
            results = client.map(SIGNATURE, items, session="bench-map")
            elapsed = time.perf_counter() - t0
            client_cpu = time.process_time() - proc0
            cpu1 = [cpu_s(w.pid) for w in workers]
            if len(results) != n:
                raise RuntimeError(f"map returned {len(results)} results for {n} inputs")
            run = {"n": n, "elapsed_s": round(elapsed, 4), "tasks_per_s": n / elapsed,
                   "client_cpu_ms_per_item": round(client_cpu * 1000 / n, 4),
                   "worker_cpu_ms_per_item": round(sum(b - a for a, b in zip(cpu0, cpu1, strict=True)) * 1000 / n, 4)}
            runs.append(run)
            print(f"  map round {r + 1}/{ctx.rounds}: {run['tasks_per_s']:8.1f} predictions/s", flush=True)
    finally:
        client.close()
        for w in workers:
            w.stop()
    m = median_run(runs)
    rows = [
        ratio_row("map", "Client.map qa, mock LM (2 procs x 16 threads)", m["tasks_per_s"], DSPEX_CLAIM_RPS,
                  "DSPex claim", "predictions/s", 1.0, "> 1300/s"),
        Row("map", "client CPU per item (validate+send+collect)", m["client_cpu_ms_per_item"], "ms"),
        Row("map", "  of which schema validation", validate_s * 1000 / n, "ms"),
        Row("map", "worker CPU per item (both procs)", m["worker_cpu_ms_per_item"], "ms"),
    ]
    return Outcome(rows, {"n": n, "workers": 2, "concurrency": concurrency, "chunk_size": client.settings.map_chunk_size,
                          "validate_ms_per_item": round(validate_s * 1000 / n, 4), "rounds": runs})


# -- scenario 3: io --------------------------------------------------------------------
def dspy_parallel_run(mock: MockLMProcess, items: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """``dspy.Parallel`` in this process over plain ``dspy.Predict``; warm-up, then one timed pass."""
    import dspy

    import signatures

    lm = dspy.LM("openai/mock", api_base=mock.api_base, api_key="sk-bench", cache=False, num_retries=0)
    predict = dspy.Predict(signatures.qa.to_dspy())
    parallel = dspy.Parallel(num_threads=concurrency, disable_progress_bar=True)
    with dspy.context(lm=lm):
        parallel([(predict, question(10**7 + i)) for i in range(concurrency)])  # warm-up, untimed
        mock.reset_stats()
        proc0, mock0 = time.process_time(), cpu_s(mock.pid)
        t0 = time.perf_counter()
        out = parallel([(predict, item) for item in items])
        elapsed = time.perf_counter() - t0
        proc1, mock1 = time.process_time(), cpu_s(mock.pid)
    stats = mock.stats()
    missing = sum(1 for p in out if p is None or not getattr(p, "answer", None))
    if missing:
        raise RuntimeError(f"dspy.Parallel: {missing} of {len(items)} predictions failed")
    n = len(items)
    return {"n": n, "elapsed_s": round(elapsed, 4), "tasks_per_s": n / elapsed, "mock_stats": stats,
            "cpu_ms_per_task": {"bench_process": round((proc1 - proc0) * 1000 / n, 4),
                                "mock": round((mock1 - mock0) * 1000 / n, 4)}}


def scenario_io(ctx: Context) -> Outcome:
    """Rounds of (dspex worker, dspy.Parallel plain), then the memoization, then rounds of (memoized, worker).

    The worker stays paused (no CPU) while the baseline runs in this process; medians per kind.
    """
    from dspex_tasks.client import Client

    n = 600 if ctx.quick else 2000
    concurrency = 200
    latency_ms = 200.0
    mock = MockLMProcess(latency_ms=latency_ms, log_dir=ctx.log_dir)
    env = dspex_worker_env(ctx, concurrency, DSPEX_LM="openai/mock", DSPEX_LM_API_BASE=mock.api_base,
                           DSPEX_LM_API_KEY="sk-bench", DSPEX_LM_NUM_RETRIES="0")
    worker = WorkerProcess("workers.app", redis_url=ctx.url, queues="dspex.predict", concurrency=concurrency,
                           log_dir=ctx.log_dir, name="dspex-io", env=env)
    client = Client(settings=client_settings(ctx))
    items = [question(i) for i in range(n)]
    runs: dict[str, list[dict[str, Any]]] = {"dspex": [], "plain": [], "memoized": []}
    try:
        mock.wait_ready()
        worker.wait_ready()
        worker.pause()

        def send(i: int) -> str:
            return client.submit(SIGNATURE, question(i), session="bench-io").id

        key_for = client.app.backend.get_key_for_task

        def run_worker(r: int) -> None:
            mock.reset_stats()
            run = pre_enqueued_run(worker, send, key_for, client.redis, n, start=r * n,
                                   extra_pids={"mock": mock.pid})
            run["mock_stats"] = mock.stats()
            runs["dspex"].append(run)
            report("dspex worker", run)

        def run_parallel(kind: str) -> None:
            run = dspy_parallel_run(mock, items, concurrency)
            runs[kind].append(run)
            report(f"dspy.Parallel {kind}", run)

        def report(label: str, run: dict[str, Any]) -> None:
            print(f"  io {label:24s}: {run['tasks_per_s']:8.1f} tasks/s, max in flight "
                  f"{run['mock_stats']['max_in_flight']}", flush=True)

        pre_enqueued_run(worker, send, key_for, client.redis, concurrency, start=10**8)  # warm-up, untimed
        for r in range(ctx.rounds):
            run_worker(r)
            run_parallel("plain")
        from dspex_tasks.worker.dspy_patches import apply_dspy_speedups

        apply_dspy_speedups()  # irreversible in this process: every plain run comes before it
        for r in range(ctx.rounds):
            run_parallel("memoized")
            run_worker(ctx.rounds + r)
    finally:
        client.close()
        worker.stop()
        mock.stop()
    ours, plain, memo = median_run(runs["dspex"]), median_run(runs["plain"]), median_run(runs["memoized"])
    ideal = concurrency / (latency_ms / 1000.0)
    rows = [
        Row("io", f"dspex worker, HTTP mock {latency_ms:.0f} ms (1 proc, {concurrency} threads)",
            ours["tasks_per_s"], "tasks/s", ideal, "latency bound"),
        ratio_row("io", "  vs dspy.Parallel(200), plain DSPy", ours["tasks_per_s"], plain["tasks_per_s"],
                  "Parallel plain", "tasks/s", 0.7, ">= 0.7"),
        ratio_row("io", "  vs dspy.Parallel(200), price lookup memoized", ours["tasks_per_s"], memo["tasks_per_s"],
                  "Parallel memo", "tasks/s", 0.7, ">= 0.7"),
        Row("io", "calls in flight per worker process (max)", ours["mock_stats"]["max_in_flight"], "calls",
            float(concurrency), "threads"),
        Row("io", "calls in flight, dspy.Parallel plain (max)", plain["mock_stats"]["max_in_flight"], "calls",
            float(concurrency), "threads"),
        Row("io", "calls in flight, dspy.Parallel memoized (max)", memo["mock_stats"]["max_in_flight"], "calls",
            float(concurrency), "threads"),
        Row("io", "CPU per call: dspex worker process", ours["cpu_ms_per_task"]["worker"], "ms"),
        Row("io", "CPU per call: bench process, Parallel plain", plain["cpu_ms_per_task"]["bench_process"], "ms"),
        Row("io", "CPU per call: bench process, Parallel memoized", memo["cpu_ms_per_task"]["bench_process"], "ms"),
        Row("io", "CPU per call: mock LM server (dspex phase)", ours["cpu_ms_per_task"]["mock"], "ms"),
    ]
    ratios = {"plain": [round(d["tasks_per_s"] / p["tasks_per_s"], 3) for d, p in
                        zip(runs["dspex"][:ctx.rounds], runs["plain"], strict=True)],
              "memoized": [round(d["tasks_per_s"] / m["tasks_per_s"], 3) for d, m in
                           zip(runs["dspex"][ctx.rounds:], runs["memoized"], strict=True)]}
    return Outcome(rows, {"n": n, "concurrency": concurrency, "latency_ms": latency_ms, "ideal_tasks_per_s": ideal,
                          "ratio_per_round": ratios, "runs": runs})


RUNNERS: dict[str, Callable[[Context], Outcome]] = {
    "overhead": scenario_overhead, "map": scenario_map, "io": scenario_io}


# -- output ---------------------------------------------------------------------------------
def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if unit in ("tasks/s", "predictions/s"):
        return f"{value:,.0f} {unit}"
    if unit == "calls":
        return f"{value:,.0f}"
    return f"{value:.3f} {unit}".strip()


def render(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dspex-tasks runtime benchmark", show_lines=False)
    for col, justify in (("scenario", "left"), ("metric", "left"), ("ours", "right"), ("reference", "right"),
                         ("ratio", "right"), ("aim", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        ref = "—" if r.reference is None else f"{fmt(r.reference, r.unit)} ({r.reference_label})"
        aim = r.aim + ("" if r.met is None else (" met" if r.met else " MISSED"))
        table.add_row(r.scenario, r.metric, fmt(r.ours, r.unit), ref,
                      "—" if r.ratio is None else f"{r.ratio:.2f}", aim or "—")
    Console(width=160).print(table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small N and one round per scenario")
    parser.add_argument("--json", action="store_true", help="print a JSON document at the end")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, from {SCENARIOS}")
    parser.add_argument("--rounds", type=int, default=None, help="rounds for overhead and map (default 3, quick 1)")
    ns = parser.parse_args(argv)
    ns.selected = [s.strip() for s in ns.scenarios.split(",") if s.strip()]
    unknown = [s for s in ns.selected if s not in SCENARIOS]
    if unknown or not ns.selected:
        parser.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    ns.rounds = ns.rounds or (1 if ns.quick else 3)
    return ns


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd() + os.sep) else sys.executable
    command = " ".join(shlex.quote(a) for a in [exe, *sys.argv])
    machine = machine_info()
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()), flush=True)
    log_dir = new_log_dir()
    print(f"logs:    {log_dir}", flush=True)
    redis = RedisServer()
    outcomes: dict[str, Outcome] = {}
    try:
        redis.start()
        ctx = Context(redis, f"bench{uuid.uuid4().hex[:8]}", log_dir, args.quick, args.rounds)
        for name in args.selected:
            print(f"[{name}]", flush=True)
            outcomes[name] = RUNNERS[name](ctx)
    except KeyboardInterrupt:
        print("interrupted; stopping workers, mock LM and Redis", file=sys.stderr)
        return 130
    finally:
        cleanup_all()
        redis.stop()
    rows = [row for o in outcomes.values() for row in o.rows]
    render(rows)
    if args.json:
        doc = {"command": command, "machine": machine, "quick": args.quick, "rounds": args.rounds,
               "scenarios": {k: {"rows": [asdict(r) for r in o.rows], "details": o.details}
                             for k, o in outcomes.items()}}
        print(json.dumps(doc, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
