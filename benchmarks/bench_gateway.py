"""Benchmark the HTTP gateway: requests/s for submit and for run-and-wait, next to ``Client.submit`` in the same run.

One run starts a private Redis, worker OS processes (``celery worker``, threads pool, in-process mock LM) and
``dspex gateway`` as its own OS process (uvicorn; rate limit 0 = none, but every request still runs the key
check and bucket script), then, in alternating rounds:

* ``submit``: ``POST /v1/signatures/qa/jobs`` (202) from C concurrent keep-alive HTTP connections
  (``httpx.AsyncClient`` in this process), next to ``Client.submit`` from one thread (the library call a
  Python service makes) and from C threads. The workers are paused (SIGSTOP) while submitting, so this is
  the enqueue path alone; they drain afterwards.
* ``run``: ``POST /v1/signatures/qa:run`` (200 with the result) from C connections, next to
  ``Client.submit(...).get()`` from C threads (one ``Client`` per thread).

Between phases the workers drain (every result of the phase stored), so no phase competes with the previous
one's backlog. Reported: median requests/s over the rounds, gateway CPU per request (``/proc``), latency
p50/p99 of the median round, and "vs Client": gateway submit over the faster ``Client.submit`` row, gateway
run over ``Client.submit+get``.

Usage::

    python benchmarks/bench_gateway.py                  # 3 rounds, N=2000, C=32
    python benchmarks/bench_gateway.py --quick --json   # 1 round, N=300, C=16, plus a JSON document
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import (  # noqa: E402
    ManagedProcess,
    WorkerProcess,
    child_env,
    cleanup_all,
    free_port,
    install_signal_handlers,
    machine_info,
    new_log_dir,
    wait_results,
)
from dspex_tasks.testing.redis_server import RedisServer  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
SIGNATURE = "qa"


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def question(i: int) -> dict[str, Any]:
    return {"question": f"What is fact number {i} about the history of computing, in one sentence?"}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class GatewayProcess(ManagedProcess):
    def __init__(self, redis_url: str, namespace: str, log_dir: Path, workers: int) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "dspex_tasks", "gateway", "--port", str(self.port), "--workers", str(workers),
                "--log-level", "warning"]
        env = child_env(redis_url, DSPEX_NAMESPACE=namespace, DSPEX_GATEWAY_RATE_PER_MIN="0")
        super().__init__(f"gateway-{self.port}", argv, env, log_dir)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).json().get("signatures", 0) >= 1:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready:\n{self.log()[-3000:]}")


# -- one phase each ----------------------------------------------------------------------------------------
async def _http_phase(url: str, key: str, path: str, n: int, concurrency: int, start: int,
                      expect: int) -> tuple[float, list[float], list[str]]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    ids: list[str] = []
    retried: list[int] = []
    counter = iter(range(start, start + n))
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=120) as client:

        async def one_connection() -> None:
            for i in counter:
                t = time.perf_counter()
                try:
                    r = await client.post(path, json={"inputs": question(i), "session": "bench-gw"})
                except (httpx.ReadError, httpx.RemoteProtocolError):  # a keep-alive connection closed under us
                    retried.append(i)
                    r = await client.post(path, json={"inputs": question(i), "session": "bench-gw"})
                latencies.append(time.perf_counter() - t)
                if r.status_code != expect:
                    raise RuntimeError(f"{path}: {r.status_code} {r.text[:500]}")
                ids.append(r.json()["id"])

        t0 = time.perf_counter()
        await asyncio.gather(*(one_connection() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    if retried:
        print(f"    ({len(retried)} requests retried after the server closed a keep-alive connection)", flush=True)
    return elapsed, latencies, ids


def _thread_phase(call: Callable[[int, int], str], n: int, threads: int,
                  start: int) -> tuple[float, list[float], list[str]]:
    """``call(thread_index, i)`` for i in [start, start + n) from ``threads`` threads."""
    latencies: list[float] = []
    ids: list[str] = []
    lock = threading.Lock()
    counter = iter(range(start, start + n))

    def worker(t_index: int) -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t = time.perf_counter()
            job_id = call(t_index, i)
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                ids.append(job_id)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(worker, t) for t in range(threads)]:
            f.result()
    return time.perf_counter() - t0, latencies, ids


class Bench:
    def __init__(self, redis_url: str, namespace: str, gateway: GatewayProcess, workers: list[WorkerProcess],
                 key: str, concurrency: int) -> None:
        from dspex_tasks.client import Client
        from dspex_tasks.settings import load_settings

        self.settings = load_settings(redis_url=redis_url, namespace=namespace)
        self.client = Client(settings=self.settings)
        self.thread_clients = [Client(settings=self.settings) for _ in range(concurrency)]
        self.gateway = gateway
        self.workers = workers
        self.key = key
        self.c = concurrency

    def close(self) -> None:
        for c in [self.client, *self.thread_clients]:
            c.close()

    def _submit(self, _t: int, i: int) -> str:  # one Client shared by the threads (kombu's producer pool)
        return str(self.client.submit(SIGNATURE, question(i), session="bench-gw").id)

    def drain(self, ids: list[str], timeout_s: float = 600.0) -> None:
        key_for = self.client.app.backend.get_key_for_task
        _, results = wait_results(self.client.redis, [key_for(i) for i in ids], timeout_s=timeout_s)
        failed = [r for r in results if r.get("status") != "SUCCESS"]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(ids)} jobs failed, e.g. {failed[0]!r:.600}")

    def run(self, kind: str, n: int, start: int) -> dict[str, Any]:
        submit_only = "+get" not in kind and "run" not in kind
        if submit_only:  # enqueue cost alone: the workers neither compete for CPU nor consume meanwhile
            for w in self.workers:
                w.pause()
        cpu0 = cpu_s(self.gateway.pid)
        if kind == "gateway submit":
            elapsed, lat, ids = asyncio.run(_http_phase(self.gateway.url, self.key, f"/v1/signatures/{SIGNATURE}/jobs",
                                                        n, self.c, start, 202))
        elif kind == "gateway run":
            elapsed, lat, ids = asyncio.run(_http_phase(self.gateway.url, self.key, f"/v1/signatures/{SIGNATURE}:run",
                                                        n, self.c, start, 200))
        elif kind == "Client.submit 1 thread":
            elapsed, lat, ids = _thread_phase(self._submit, n, 1, start)
        elif kind == "Client.submit C threads":
            elapsed, lat, ids = _thread_phase(self._submit, n, self.c, start)
        else:  # Client.submit + get, C threads
            def submit_get(t: int, i: int) -> str:  # a Client per thread: one result consumer each
                job = self.thread_clients[t].submit(SIGNATURE, question(i), session="bench-gw")
                job.get(timeout=120)
                return job.id

            elapsed, lat, ids = _thread_phase(submit_get, n, self.c, start)
        gw_cpu = cpu_s(self.gateway.pid) - cpu0
        for w in self.workers:
            w.resume()
        self.drain(ids)
        return {"kind": kind, "n": n, "elapsed_s": round(elapsed, 4), "rps": n / elapsed,
                "p50_ms": round(pct(lat, 0.5) * 1000, 2), "p99_ms": round(pct(lat, 0.99) * 1000, 2),
                "gateway_cpu_ms_per_req": round(gw_cpu * 1000 / n, 3) if kind.startswith("gateway") else None}


KINDS = ["Client.submit 1 thread", "Client.submit C threads", "gateway submit", "Client.submit+get C threads",
         "gateway run"]


def render(rows: list[dict[str, Any]], c: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dspex-tasks gateway benchmark (C = {c})")
    for col in ("what", "requests/s", "vs Client", "p50 ms", "p99 ms", "gateway CPU ms/req"):
        table.add_column(col, justify="left" if col == "what" else "right")
    for r in rows:
        ratio = "—" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        cpu = "—" if r["gateway_cpu_ms_per_req"] is None else f"{r['gateway_cpu_ms_per_req']:.3f}"
        table.add_row(r["kind"].replace("C threads", f"{c} threads"), f"{r['rps']:,.0f}", ratio, f"{r['p50_ms']:.1f}",
                      f"{r['p99_ms']:.1f}", cpu)
    Console(width=140).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1 round, N=300, C=16")
    parser.add_argument("--json", action="store_true", help="print a JSON document at the end")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("-n", type=int, default=None, help="requests per phase")
    parser.add_argument("-c", "--concurrency", type=int, default=None, help="HTTP connections / client threads")
    parser.add_argument("--worker-procs", type=int, default=2)
    parser.add_argument("--gateway-workers", type=int, default=1, help="uvicorn processes")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    n = args.n or (300 if args.quick else 2000)
    c = args.concurrency or (16 if args.quick else 32)
    install_signal_handlers()
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv])
    machine = machine_info()
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()), flush=True)
    log_dir = new_log_dir()
    print(f"logs:    {log_dir}", flush=True)
    redis = RedisServer()
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    bench: Bench | None = None
    try:
        redis.start()
        ns = f"bench{uuid.uuid4().hex[:8]}"
        env = {"DSPEX_NAMESPACE": ns, "DSPEX_LM": "mock", "DSPEX_SIGNATURE_MODULES": "signatures"}
        workers = [WorkerProcess("workers.app", redis_url=redis.url, queues="dspex.predict", concurrency=32,
                                 log_dir=log_dir, name=f"gwbench{i}", env=env) for i in range(args.worker_procs)]
        gateway = GatewayProcess(redis.url, ns, log_dir, args.gateway_workers)
        for w in workers:
            w.wait_ready()
        gateway.wait_ready()
        from dspex_tasks.gateway.auth import KeyStore

        bench = Bench(redis.url, ns, gateway, workers, "", c)
        bench.key, _ = KeyStore(redis=bench.client.redis, namespace=ns).create("bench", sessions=["bench-gw"])
        for kind in KINDS:  # warm-up, untimed
            bench.run(kind, min(200, n), 10**8)
        for r in range(rounds):
            for j, kind in enumerate(KINDS):
                result = bench.run(kind, n, (r * len(KINDS) + j) * n)
                runs[kind].append(result)
                print(f"  round {r + 1} {kind}: {result['rps']:,.0f}/s", flush=True)
    except KeyboardInterrupt:
        print("interrupted; stopping workers, gateway and Redis", file=sys.stderr)
        return 130
    finally:
        if bench is not None:
            bench.close()
        cleanup_all()
        redis.stop()
    rows = []
    for kind in KINDS:
        ordered = sorted(runs[kind], key=lambda x: x["rps"])
        row = dict(ordered[(len(ordered) - 1) // 2])
        row["rps"] = statistics.median(x["rps"] for x in ordered)
        rows.append(row)
    by = {r["kind"]: r for r in rows}
    best_client = max(by["Client.submit 1 thread"]["rps"], by["Client.submit C threads"]["rps"])
    by["gateway submit"]["ratio"] = by["gateway submit"]["rps"] / best_client
    by["gateway run"]["ratio"] = by["gateway run"]["rps"] / by["Client.submit+get C threads"]["rps"]
    render(rows, c)
    if args.json:
        print(json.dumps({"command": command, "machine": machine, "rounds": rounds, "n": n, "concurrency": c,
                          "rows": rows, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
