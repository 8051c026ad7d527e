"""Worker CPU per job: a 2-predictor program vs one signature, each against the same module called in process.

The question (issue 14): does serving a composed ``dspy.Module`` through the queue add more than serving
one signature does? For each of ``bench_one`` (one Predict) and ``bench_two`` (two predictors, two LM calls),
both with the in-process mock LM so the LM costs next to nothing:

* in process: CPU per call of ``module(**inputs)`` under ``dspy.context(lm=MockLM())``, in this process;
* queued: CPU of a real worker OS process (``celery -A workers.app worker``, threads pool, private Redis)
  per job, from ``/proc/<pid>/stat``, for jobs sent by ``Client.submit`` and awaited in batches.

"added" is queued minus in process: what the queue, validation, usage accounting and result storage
cost per job. Both kinds are measured in one run, alternating rounds, so machine noise falls on both.

Usage::

    python benchmarks/bench_program.py [--jobs 300] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._harness import WorkerProcess, cleanup_all, install_signal_handlers, new_log_dir  # noqa: E402

KINDS = ("bench_one", "bench_two")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_process_cpu_us(name: str, n: int) -> float:
    import dspy

    from benchmarks import program_defs  # noqa: F401 - registers both
    from dspex_tasks.dsl.signature import registry
    from dspex_tasks.programs.bridge import build_module
    from dspex_tasks.testing.mock_lm import MockLM

    module = build_module(registry.get(name))
    with dspy.context(lm=MockLM()):
        for i in range(20):
            module(question=f"warm {i}")
        t0 = time.process_time()
        for i in range(n):
            module(question=f"q {i}")
        return (time.process_time() - t0) / n * 1e6


def queued_cpu_us(client: Any, worker_pid: int, name: str, n: int, batch: int = 50) -> tuple[float, int]:
    t0 = _cpu_s(worker_pid)
    calls = 0
    for start in range(0, n, batch):
        jobs = [client.submit(name, {"question": f"q {start + i}"}) for i in range(min(batch, n - start))]
        for job in jobs:
            calls += job.get(timeout=60).usage["lm_calls"]
    return (_cpu_s(worker_pid) - t0) / n * 1e6, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300, help="jobs per kind and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print only the JSON")
    args = parser.parse_args()
    install_signal_handlers()
    from dspex_tasks.client import Client
    from dspex_tasks.settings import Settings
    from dspex_tasks.testing.redis_server import RedisServer

    samples: dict[str, dict[str, list[float]]] = {k: {"in_process": [], "queued": []} for k in KINDS}
    calls: dict[str, int] = dict.fromkeys(KINDS, 0)
    with RedisServer() as server:
        worker = WorkerProcess("workers.app", redis_url=server.url, queues="dspex.predict", concurrency=8,
                               log_dir=new_log_dir(), env={"DSPEX_SIGNATURE_MODULES": "benchmarks.program_defs",
                                                           "DSPEX_LM": "mock"})
        client = Client(settings=Settings(redis_url=server.url))
        try:
            worker.wait_ready()
            for kind in KINDS:  # warm the worker's caches and connections
                queued_cpu_us(client, worker.pid, kind, 50)
            for _ in range(args.rounds):
                for kind in KINDS:
                    samples[kind]["in_process"].append(in_process_cpu_us(kind, args.jobs))
                    us, n_calls = queued_cpu_us(client, worker.pid, kind, args.jobs)
                    samples[kind]["queued"].append(us)
                    calls[kind] = n_calls // args.jobs
        finally:
            client.close()
            worker.stop()
            cleanup_all()
    rows = {}
    for kind in KINDS:
        inproc, queued = (statistics.median(samples[kind][k]) for k in ("in_process", "queued"))
        rows[kind] = {"lm_calls_per_job": calls[kind], "in_process_us": round(inproc), "queued_us": round(queued),
                      "added_us": round(queued - inproc), "queued_over_in_process": round(queued / inproc, 2)}
    result = {"jobs_per_round": args.jobs, "rounds": args.rounds, "kinds": rows,
              "added_two_over_one": round(rows["bench_two"]["added_us"] / rows["bench_one"]["added_us"], 2)}
    if not args.json:
        print(f"{'kind':<10} {'LM calls':>8} {'in process µs':>14} {'queued µs':>10} {'added µs':>9} {'ratio':>6}")
        for kind, r in rows.items():
            print(f"{kind:<10} {r['lm_calls_per_job']:>8} {r['in_process_us']:>14} {r['queued_us']:>10} "
                  f"{r['added_us']:>9} {r['queued_over_in_process']:>6}")
        print(f"added per job, 2-predictor program / one signature: {result['added_two_over_one']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
