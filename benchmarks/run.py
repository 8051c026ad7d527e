"""The benchmark suite in one command: every scenario side by side in one run, against one private Redis.

Starts its own ``redis-server``, worker OS processes (``celery worker`` / ``dspex worker --processes 8``) and
the HTTP mock LM in its own OS process, runs the scenarios in order, stops everything (no orphans), and prints
one table: scenario, metric, ours, reference, ratio, aim, met?.

Scenarios (``--scenarios`` picks a subset):

* ``overhead``, ``map``, ``io``: imported from ``bench_runtime.py`` (queue overhead vs raw Celery, ``Client.map``
  predictions/s, one worker process vs ``dspy.Parallel`` on a 200 ms HTTP mock and calls in flight).
* ``latency``: ``Client.submit(...).get()`` one at a time against a 50 ms HTTP mock, minus the 50 ms (p50, p99).
* ``coldstart``: ``dspex worker --processes 8`` with 100 stored session programs to pre-warm: launch to first
  served task.
* ``progcache``: ``ProgramCache.get`` hit vs miss on a real ``ProgramStore`` and ``load_program``.
* ``lmcache``: the same prompts twice, provider calls with ``DSPEX_LM_SHARED_CACHE=1`` vs without (only when
  the shared LM cache exists in this checkout).
* ``scaling``: 1, 2, 3 worker processes on the I/O-bound workload; plot in ``benchmarks/out/throughput.png``
  (copied to ``docs/throughput.png``).
* ``inflight``, ``ttft``, ``livemem``, ``mapio``: live execution and the async path (issue 15), from
  ``bench_live.py``: calls in flight and calls/s of single tasks, ``Client.map`` on the async and the thread
  path and in-process ``dspy.Parallel`` (1000 ms HTTP mock; plot ``benchmarks/out/live_inflight.png``, copied to
  ``docs/live_inflight.png`` by a non-quick run); time to the first streamed token; worker memory over many
  streamed jobs and per call in flight; ``Client.map`` vs single tasks at equal concurrency. Not in the default
  selection (they take several minutes): name them in ``--scenarios``.

Usage::

    python benchmarks/run.py                 # default run (< 10 min on 2 cores)
    python benchmarks/run.py --quick --json  # short run (< 3 min), plus a JSON document
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
from dataclasses import asdict
from pathlib import Path

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before anything imports dspy / litellm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_live, bench_suite  # noqa: E402
from benchmarks._harness import cleanup_all, install_signal_handlers, machine_info, new_log_dir  # noqa: E402
from benchmarks.bench_runtime import (  # noqa: E402
    Context,
    Outcome,
    Row,
    scenario_io,
    scenario_map,
    scenario_overhead,
)
from dspex_tasks.testing.redis_server import RedisServer  # noqa: E402

RUNNERS: dict[str, Callable[[Context], Outcome]] = {
    "overhead": scenario_overhead,
    "map": scenario_map,
    "io": scenario_io,
    "latency": bench_suite.scenario_latency,
    "coldstart": bench_suite.scenario_coldstart,
    "progcache": bench_suite.scenario_progcache,
    "lmcache": bench_suite.scenario_lmcache,
    "scaling": bench_suite.scenario_scaling,
    "inflight": bench_live.scenario_inflight,
    "ttft": bench_live.scenario_ttft,
    "livemem": bench_live.scenario_livemem,
    "mapio": bench_live.scenario_mapio,
    "events": bench_live.scenario_events,
}
#: Scenarios run only when named in ``--scenarios`` (long; see the module docstring).
OPT_IN = ("inflight", "ttft", "livemem", "mapio", "events")
IN_FLIGHT_AIM = 150


def adjust(name: str, outcome: Outcome) -> Outcome:
    """Aims the suite sets on rows that ``bench_runtime.py`` reports without one."""
    for row in outcome.rows:
        if name == "io" and row.metric.startswith("calls in flight per worker process"):
            row.aim, row.met = f">= {IN_FLIGHT_AIM}", row.ours >= IN_FLIGHT_AIM
        if name == "map" and row.aim:
            row.aim = ">= 1300/s"
    return outcome


def fmt(value: float | None, unit: str = "") -> str:
    if value is None or value != value:  # None or NaN (a scenario that did not run)
        return "—"
    if unit in ("tasks/s", "predictions/s"):
        return f"{value:,.0f} {unit}"
    if unit == "calls":
        return f"{value:,.0f}"
    if unit == "us":
        return f"{value:,.1f} µs"
    if unit == "ms" and abs(value) >= 1000:
        return f"{value / 1000:,.2f} s"
    return f"{value:.3f} {unit}".strip()


def table_rows(rows: list[Row]) -> list[tuple[str, ...]]:
    out = []
    for r in rows:
        ref = "—" if r.reference is None else f"{fmt(r.reference, r.unit)} ({r.reference_label})"
        met = "—" if r.met is None else ("yes" if r.met else "NO")
        out.append((r.scenario, r.metric, fmt(r.ours, r.unit), ref, "—" if r.ratio is None else f"{r.ratio:.2f}",
                    r.aim or "—", met))
    return out


COLUMNS = ("scenario", "metric", "ours", "reference", "ratio", "aim", "met?")


def render(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="right" if col in ("ours", "reference", "ratio") else "left")
    for values in table_rows(rows):
        table.add_row(*values)
    Console(width=170).print(table)


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---:|---:|---:|---|---|"]
    lines += ["| " + " | ".join(v.replace("|", "/") for v in values) + " |" for values in table_rows(rows)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short run: small N, one round (< 3 min)")
    parser.add_argument("--json", action="store_true", help="print a JSON document at the end")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--scenarios", default=",".join(k for k in RUNNERS if k not in OPT_IN),
                        help=f"comma-separated, from {tuple(RUNNERS)}")
    parser.add_argument("--rounds", type=int, default=None, help="rounds for overhead, map, io (default 3, quick 1)")
    ns = parser.parse_args(argv)
    ns.selected = [s.strip() for s in ns.scenarios.split(",") if s.strip()]
    unknown = [s for s in ns.selected if s not in RUNNERS]
    if unknown or not ns.selected:
        parser.error(f"unknown scenarios {unknown}; choose from {', '.join(RUNNERS)}")
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
    skipped: dict[str, str] = {}
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    try:
        redis.start()
        ctx = Context(redis, f"bench{uuid.uuid4().hex[:8]}", log_dir, args.quick, args.rounds)
        for name in args.selected:
            if name == "lmcache" and not bench_suite.lm_cache_available():
                skipped[name] = "not run (feature missing)"
                print(f"[{name}] not run (feature missing)", flush=True)
                continue
            print(f"[{name}]", flush=True)
            t0 = time.perf_counter()
            try:
                outcomes[name] = adjust(name, RUNNERS[name](ctx))
            except Exception as exc:  # noqa: BLE001 - one broken scenario must not sink the rest
                skipped[name] = f"failed: {exc!s:.300}"
                print(f"  {name} failed: {exc!s:.2000}", file=sys.stderr, flush=True)
            finally:
                cleanup_all()
            timings[name] = round(time.perf_counter() - t0, 1)
            print(f"  ({timings[name]} s)", flush=True)
    except KeyboardInterrupt:
        print("interrupted; stopping workers, mock LM and Redis", file=sys.stderr)
        return 130
    finally:
        cleanup_all()
        redis.stop()
    total_s = round(time.perf_counter() - t_start, 1)
    rows = [row for o in outcomes.values() for row in o.rows]
    rows += [Row(name, reason, float("nan")) for name, reason in skipped.items()]
    render(rows, f"dspex-tasks benchmark suite ({'quick' if args.quick else 'default'} run, {total_s} s)")
    if args.markdown:
        print(markdown(rows))
    if args.json:
        doc = {"command": command, "machine": machine, "quick": args.quick, "rounds": args.rounds,
               "total_s": total_s, "scenario_s": timings, "skipped": skipped,
               "scenarios": {k: {"rows": [asdict(r) for r in o.rows], "details": o.details}
                             for k, o in outcomes.items()}}
        print(json.dumps(doc, indent=2, default=str))
    return 1 if any(v.startswith("failed") for v in skipped.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
