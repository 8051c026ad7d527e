"""Benchmark the reliable fetch (``dspex_tasks.worker.fetch``, issue 13) against kombu's own Redis transport.

Side by side in one run, rounds interleaved (the order alternates every round), each mode against a private
``redis-server`` of its own; the table reports medians and dspex/kombu (the median of the per-round ratios
where rounds are listed, else the ratio of pooled values):

* ``throughput``: N messages pre-published to a queue, then drained by one consumer OS process on kombu's
  ``Hub`` (prefetch 10, ack from the callback), timed inside the consumer from the start of its event loop
  to its N-th ack. Also its CPU, Redis's CPU (``INFO cpu``) and Redis commands (``INFO commandstats``: calls,
  and Redis's time in each, printed per round) per message. Once with small messages (~310 bytes as
  stored) and once with 32 KB of padding in the body (~44 KB stored, base64): the fetch script decodes
  each message's JSON inside Redis, so its cost there grows with the message.
* ``celery``: the ``overhead`` scenario of ``benchmarks/run.py`` (same workers, same
  ``bench_runtime.pre_enqueued_run``: messages enqueued while the worker is SIGSTOPped, timed to the last
  ``date_done``) with ``DSPEX_RELIABLE_FETCH=1`` vs ``0``: a bare Celery no-op worker and a dspex ``qa``
  worker, one process each, threads pool, concurrency 16. ``run.py`` itself cannot do it: its workers'
  environment drops every outside ``DSPEX_*`` variable (``_harness.child_env``). All four workers start
  once (each on its own queue) and stay SIGSTOPped except while timed.
* ``idle``: one idle consumer per transport, each against its own Redis, all at once, for 20 s: the
  consumer's CPU seconds (``/proc/<pid>/task/*/schedstat``), the Redis commands per second it causes and Redis's CPU, next
  to a Redis with no consumer (the server's own baseline).
* ``ack``: one message at a time; the time from a task returning to its ``unacked`` entry being deleted (the
  ``HDEL`` reply is back in the consumer), p50/p95. ``callback``: ack from the message callback.
  ``threads``: Celery's threads-pool path: the callback hands the message to a task thread, which, when the
  task (a 5-40 ms sleep) returns, hands the ack to the event loop with ``hub.call_soon`` (prefetch 1, so no
  fetch is outstanding meanwhile, as in a saturated pool). ``threads, hub waker off``: the same with the
  Hub's cross-thread wakeup disabled (a kombu without it), where the 50 ms wake timer matters.

``idle`` and ``ack`` also run ``dspex-nowake``: the dspex transport with its 50 ms wake timer cancelled, to
show what that timer costs and buys.

Usage::

    python benchmarks/bench_fetch.py                 # default run (< 3 min on 2 cores)
    python benchmarks/bench_fetch.py --quick         # short run (< 1 min)
    python benchmarks/bench_fetch.py --modes throughput,idle --json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import random
import resource
import shlex
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before anything imports dspy / litellm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import (  # noqa: E402
    ManagedProcess,
    WorkerProcess,
    child_env,
    cleanup_all,
    install_signal_handlers,
    machine_info,
    new_log_dir,
)
from dspex_tasks.testing.redis_server import RedisServer  # noqa: E402

MODES = ("throughput", "celery", "idle", "ack")
#: What each transport name means in a consumer process (``dspex-nowake``: see :func:`transport_cls`).
TRANSPORTS = ("dspex", "kombu", "dspex-nowake")
PAIR = ("dspex", "kombu")
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Short restore settings are not needed: every message is acked. kombu's defaults otherwise.
OPTIONS: dict[str, Any] = {"visibility_timeout": 3600}
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"


# -- the consumer OS process ----------------------------------------------------------
def transport_cls(name: str) -> Any:
    """The kombu transport (a name kombu resolves, or a class) a consumer uses for ``name``."""
    if name == "kombu":
        return "redis"
    from dspex_tasks.worker import fetch

    if name == "dspex":
        return fetch.Transport

    class NoWakeTransport(fetch.Transport):
        """The dspex transport without its ``ACK_TICK_S`` wake timer (a diagnostic, not a product)."""

        def register_with_event_loop(self, connection: Any, loop: Any) -> None:
            super().register_with_event_loop(connection, loop)
            tref = getattr(self.cycle, "_dspex_wake_tref", None)  # only set on a kombu without the Hub's waker
            if tref is not None:
                tref.cancel()

    return NoWakeTransport


def consume(url: str, queue: str, transport: str, n: int, prefetch: int, ack: str, task_ms: float,
            waker: bool, pace: bool) -> None:
    """Consume ``queue`` on kombu's Hub until ``n`` acks (forever when 0), then print one ``result`` line.

    ``ack``: ``callback`` acks inside the message callback; ``threads`` runs a ``task_ms`` (up to) sleep in a
    task thread that then hands the ack to the loop with ``hub.call_soon``, as Celery's threads pool does.
    Each ack's latency (task returned -> ``HDEL`` reply back) is recorded; with ``pace`` each ack is also
    announced on the list ``<queue>:acked`` (after its latency is taken) so the publisher can pace.
    """
    import redis

    kombu = _kombu()
    hub_module: Any = importlib.import_module("kombu.asynchronous.hub")
    if not waker:  # a Hub whose call_soon from another thread does not interrupt its poll
        hub_module._Waker.wake = lambda self: None
    hub = hub_module.Hub()
    conn = kombu.Connection(url, transport=transport_cls(transport), transport_options=OPTIONS)
    conn.ensure_connection(max_retries=3)
    side = redis.Redis.from_url(url)
    latencies: list[float] = []
    state = {"acked": 0}
    pool = None
    if ack == "threads":
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=max(1, prefetch))

    def do_ack(message: Any, returned: float) -> None:
        message.ack()
        latencies.append(time.perf_counter() - returned)
        state["acked"] += 1
        if pace:
            side.lpush(f"{queue}:acked", 1)
        if n and state["acked"] >= n:
            hub.stop()

    def run_task(message: Any) -> None:
        time.sleep(random.uniform(task_ms / 8, task_ms) / 1000)
        hub.call_soon(do_ack, message, time.perf_counter())

    def on_message(_body: Any, message: Any) -> None:
        if pool is not None:
            pool.submit(run_task, message)
        else:
            do_ack(message, time.perf_counter())

    conn.register_with_event_loop(hub)
    with kombu.Consumer(conn, [kombu.Queue(queue, routing_key=queue)], callbacks=[on_message], accept=["json"],
                        prefetch_count=prefetch):
        print("ready", flush=True)
        cpu0, t0 = _self_cpu(), time.perf_counter()
        hub.run_forever()
        elapsed, cpu = time.perf_counter() - t0, _self_cpu() - cpu0
    if pool is not None:
        pool.shutdown()
    print("result " + json.dumps({"n": state["acked"], "elapsed_s": elapsed, "cpu_s": cpu,
                                  "latencies_ms": [round(x * 1000, 4) for x in latencies]}), flush=True)
    conn.release()
    hub.close()


def _kombu() -> Any:
    """kombu, untyped (it ships no complete annotations)."""
    return importlib.import_module("kombu")


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Consumer(ManagedProcess):
    """``bench_fetch.py _consume ...`` in its own OS process (see :func:`consume`)."""

    def __init__(self, url: str, queue: str, transport: str, log_dir: Path, *, n: int = 0, prefetch: int = 10,
                 ack: str = "callback", task_ms: float = 0.0, waker: bool = True, pace: bool = False) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), "_consume", url, queue, transport, str(n),
                str(prefetch), ack, str(task_ms), "1" if waker else "0", "1" if pace else "0"]
        super().__init__(f"consumer-{transport}-{uuid.uuid4().hex[:6]}", argv, child_env(None), log_dir)

    def wait_for(self, marker: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            log = self.log()
            if marker in log:
                return log
            if not self.alive:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{log[-3000:]}")
            time.sleep(0.01)
        raise TimeoutError(f"{self.name}: no {marker!r} within {timeout_s} s:\n{self.log()[-3000:]}")

    def result(self, timeout_s: float) -> dict[str, Any]:
        log = self.wait_for("result ", timeout_s)
        line = next(x for x in log.splitlines() if x.startswith("result "))
        return dict(json.loads(line.split(" ", 1)[1]))


# -- Redis-side measurements ------------------------------------------------------------
def redis_cpu_s(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def commandstats(client: Any, field: str = "calls") -> dict[str, int]:
    """``calls`` (or ``usec``) per command so far, without the benchmark's own ``INFO`` calls."""
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v[field]) for k, v in stats.items() if k != "cmdstat_info"}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def proc_cpu_s(pid: int | None) -> float:
    """CPU seconds of a process, all its threads: ``schedstat`` (ns) when there, else ``stat`` (ticks)."""
    if pid is None:
        return 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        return sum(int((task / "schedstat").read_text().split()[0])
                   for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def publish(url: str, queue: str, n: int, body_bytes: int = 0) -> None:
    """``n`` JSON messages (``body_bytes`` of padding) to ``queue`` through kombu, in pipelined batches.

    The publishing path is kombu's for both transports (the dspex transport changes only the fetch).
    """
    kombu = _kombu()
    pad = "x" * body_bytes
    with kombu.Connection(url, transport="redis") as conn:
        producer = kombu.Producer(conn.default_channel)
        q = kombu.Queue(queue, routing_key=queue)
        q(conn.default_channel).declare()
        with producer.batch(max_size=500):
            for i in range(n):
                producer.publish({"id": i, "task": "bench.fetch", "pad": pad}, routing_key=queue, serializer="json")


@contextlib.contextmanager
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def order(r: int, kinds: tuple[str, ...]) -> tuple[str, ...]:
    """The kinds in round ``r``: reversed every other round, so drift falls on both."""
    return kinds if r % 2 == 0 else tuple(reversed(kinds))


# -- results ---------------------------------------------------------------------------
@dataclass
class Row:
    mode: str
    metric: str
    unit: str
    dspex: float | None
    kombu: float | None
    #: Median of the per-round ratios dspex/kombu (None where a ratio means nothing).
    ratio: float | None = None
    nowake: float | None = None
    rounds: list[float] = field(default_factory=list)


@dataclass
class Outcome:
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def med(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def paired(runs: dict[str, list[dict[str, Any]]], key: Callable[[dict[str, Any]], float]) -> list[float]:
    return [key(d) / key(k) if key(k) else float("nan") for d, k in zip(runs["dspex"], runs["kombu"], strict=True)]


def pair_row(mode: str, metric: str, unit: str, runs: dict[str, list[dict[str, Any]]],
             key: Callable[[dict[str, Any]], float]) -> Row:
    ratios = paired(runs, key)
    return Row(mode, metric, unit, med([key(r) for r in runs["dspex"]]), med([key(r) for r in runs["kombu"]]),
               med(ratios), rounds=[round(x, 3) for x in ratios])


# -- mode 1: broker throughput -----------------------------------------------------------
def mode_throughput(args: argparse.Namespace, log_dir: Path) -> Outcome:
    n, rounds = args.n, args.rounds
    rows: list[Row] = []
    details: dict[str, Any] = {"n": n, "prefetch": args.prefetch, "by_body_bytes": {}}
    with private_redis() as server:
        client = _client(server.url)
        for body in args.body_sizes:
            runs: dict[str, list[dict[str, Any]]] = {t: [] for t in PAIR}
            for r in range(-1, rounds):  # round -1: warm-up (untimed; Redis, page cache, Lua script cache)
                for transport in order(r, PAIR):
                    queue = f"bench.fetch.tp.{transport}.{body}.{r + 1}"
                    count = n if r >= 0 else min(n, 500)
                    run = drain_once(server.url, client, queue, transport, count, body, args.prefetch, log_dir)
                    if r < 0:
                        continue
                    runs[transport].append(run)
                    print(f"  throughput {body:5d} B body, round {r + 1}/{rounds} {transport:5s}: "
                          f"{run['msgs_per_s']:6.0f} msgs/s, consumer {run['consumer_cpu_us']:.0f} µs/msg, "
                          f"redis {run['redis_cpu_us']:.0f} µs/msg, {run['redis_cmds']:.2f} cmds/msg, "
                          f"µs/msg by command {run['cmd_us_per_msg']}", flush=True)
            size = f"{body} B padding" if body else "small"
            label = f"{n} msgs ({size}), 1 consumer, prefetch {args.prefetch}, ack in callback"
            rows += [pair_row("throughput", f"publish→consume→ack: {label}", "msgs/s", runs,
                              lambda x: x["msgs_per_s"]),
                     pair_row("throughput", f"consumer CPU per message ({size})", "µs", runs,
                              lambda x: x["consumer_cpu_us"]),
                     pair_row("throughput", f"Redis CPU per message, consume + ack ({size})", "µs", runs,
                              lambda x: x["redis_cpu_us"])]
            if body == args.body_sizes[0]:
                rows.append(pair_row("throughput", "Redis commands per message, consume + ack (Lua's count)", "cmds",
                                     runs, lambda x: x["redis_cmds"]))
            details["by_body_bytes"][body] = runs
    return Outcome(rows, details)


def drain_once(url: str, client: Any, queue: str, transport: str, n: int, body: int, prefetch: int,
               log_dir: Path) -> dict[str, Any]:
    """Publish ``n`` messages, drain them with one consumer process; its rates and Redis's costs."""
    publish(url, queue, n, body)
    cpu0, cmd0 = redis_cpu_s(client), commandstats(client, "usec")
    calls0 = commandstats(client)
    consumer = Consumer(url, queue, transport, log_dir, n=n, prefetch=prefetch)
    try:
        res = consumer.result(timeout_s=120)
    finally:
        consumer.stop()
    cpu1, usec, cmds = redis_cpu_s(client), delta(commandstats(client, "usec"), cmd0), delta(commandstats(client),
                                                                                          calls0)
    left = (client.llen(queue), client.hlen(UNACKED), client.zcard(UNACKED_INDEX))
    if any(left):
        raise RuntimeError(f"{transport}: queue/unacked/index left {left} after draining {queue}")
    client.delete(queue)
    count = res["n"]
    return {"n": count, "msgs_per_s": count / res["elapsed_s"], "consumer_cpu_us": res["cpu_s"] * 1e6 / count,
            "redis_cpu_us": (cpu1 - cpu0) * 1e6 / count, "redis_cmds": sum(cmds.values()) / count,
            "cmds_per_msg": {k: round(v / count, 3) for k, v in sorted(cmds.items())},
            # Redis's own time in each command (commandstats usec; a script's includes its inner commands)
            "cmd_us_per_msg": {k: round(v / count, 1) for k, v in sorted(usec.items()) if v / count >= 0.5}}


def _client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


# -- mode 2: end-to-end Celery (run.py's overhead scenario, both ways) ----------------------
def mode_celery(args: argparse.Namespace, log_dir: Path) -> Outcome:
    from celery import Celery

    from benchmarks import bench_runtime as br
    from benchmarks import noop_app
    from dspex_tasks.app import celery_config
    from dspex_tasks.client import Client

    n_noop, n_qa, rounds, concurrency = args.celery_n, args.celery_n // 2, args.celery_rounds, 16
    flags = {"dspex": "1", "kombu": "0"}
    with private_redis() as server:
        ctx = br.Context(server, f"benchfetch{uuid.uuid4().hex[:6]}", log_dir, args.quick, rounds)
        workers: dict[tuple[str, str], WorkerProcess] = {}
        for transport, flag in flags.items():
            workers["noop", transport] = WorkerProcess(
                "benchmarks.noop_app", redis_url=ctx.url, queues=f"bench.noop.fetch{flag}", concurrency=concurrency,
                log_dir=log_dir, name=f"noop-fetch{flag}",
                env={"DSPEX_NAMESPACE": ctx.namespace, "DSPEX_RELIABLE_FETCH": flag})
            workers["qa", transport] = WorkerProcess(
                "workers.app", redis_url=ctx.url, queues=f"bench.qa.fetch{flag}", concurrency=concurrency,
                log_dir=log_dir, name=f"qa-fetch{flag}",
                env=br.dspex_worker_env(ctx, concurrency, DSPEX_RELIABLE_FETCH=flag))
        raw_app = Celery("bench-fetch-client")
        raw_app.conf.update(celery_config(br.client_settings(ctx, predict_queue=noop_app.QUEUE)))
        client = Client(settings=br.client_settings(ctx))
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {"noop": {t: [] for t in PAIR},
                                                             "qa": {t: [] for t in PAIR}}
        try:
            for w in workers.values():
                w.wait_ready()
                w.pause()
            for key in workers:
                transport_in_use = _worker_transport(workers[key])
                if transport_in_use != key[1]:
                    raise RuntimeError(f"worker {key} uses the {transport_in_use} transport")

            def sender(kind: str, transport: str) -> Callable[[int], str]:
                queue = f"bench.{kind}.fetch{flags[transport]}"
                if kind == "noop":
                    return lambda i: str(raw_app.send_task(noop_app.TASK, kwargs={"i": i}, queue=queue).id)
                return lambda i: client.submit(br.SIGNATURE, br.question(i), session="bench-fetch", queue=queue).id

            key_for = {"noop": raw_app.backend.get_key_for_task, "qa": client.app.backend.get_key_for_task}
            pids = {"redis": server.pid}
            for (kind, transport), w in workers.items():  # warm-up, untimed
                br.pre_enqueued_run(w, sender(kind, transport), key_for[kind], client.redis, 200, start=10**7)
            for r in range(rounds):
                for kind, n in (("noop", n_noop), ("qa", n_qa)):
                    for transport in order(r, PAIR):
                        run = br.pre_enqueued_run(workers[kind, transport], sender(kind, transport), key_for[kind],
                                                  client.redis, n, start=(r + 1) * 10**5, extra_pids=pids)
                        runs[kind][transport].append(run)
                        print(f"  celery round {r + 1}/{rounds} {kind:4s} {transport:5s}: "
                              f"{run['tasks_per_s']:7.0f} tasks/s (worker {run['cpu_ms_per_task']['worker']:.3f}, "
                              f"redis {run['cpu_ms_per_task']['redis']:.3f} CPU ms/task)", flush=True)
        finally:
            client.close()
            raw_app.close()
            for w in workers.values():
                w.stop()
    rows = []
    for kind, label in (("noop", f"raw Celery no-op, {n_noop} tasks"), ("qa", f"dspex qa, mock LM, {n_qa} tasks")):
        rows += [pair_row("celery", f"{label} (1 proc, 16 threads)", "tasks/s", runs[kind], lambda x: x["tasks_per_s"]),
                 pair_row("celery", f"worker CPU per task: {kind}", "ms", runs[kind],
                          lambda x: x["cpu_ms_per_task"]["worker"]),
                 pair_row("celery", f"Redis CPU per task: {kind}", "ms", runs[kind],
                          lambda x: x["cpu_ms_per_task"]["redis"])]
    return Outcome(rows, {"n_noop": n_noop, "n_qa": n_qa, "concurrency": concurrency, "pool": "threads",
                          "runs": runs})


def _worker_transport(worker: WorkerProcess) -> str:
    """Which transport a started worker consumes with, from its environment (``DSPEX_RELIABLE_FETCH``)."""
    env = Path(f"/proc/{worker.pid}/environ").read_bytes().split(b"\0")
    return "kombu" if b"DSPEX_RELIABLE_FETCH=0" in env else "dspex"


# -- mode 3: idle cost --------------------------------------------------------------------
def mode_idle(args: argparse.Namespace, log_dir: Path) -> Outcome:
    window = args.idle_s
    kinds = ("none", *TRANSPORTS)
    servers = {k: RedisServer().start() for k in kinds}
    consumers: dict[str, Consumer] = {}
    try:
        for k in TRANSPORTS:
            consumers[k] = Consumer(servers[k].url, "bench.fetch.idle", k, log_dir)
        for c in consumers.values():
            c.wait_for("ready", 30)
        time.sleep(2.0)  # past start-up and the first fetches
        clients = {k: _client(s.url) for k, s in servers.items()}
        cpu0 = {k: proc_cpu_s(c.pid) for k, c in consumers.items()}
        rcpu0 = {k: redis_cpu_s(c) for k, c in clients.items()}
        cmd0 = {k: commandstats(c) for k, c in clients.items()}
        t0 = time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - t0
        cpu1 = {k: proc_cpu_s(c.pid) for k, c in consumers.items()}
        rcpu1 = {k: redis_cpu_s(c) for k, c in clients.items()}
        cmds = {k: delta(commandstats(c), cmd0[k]) for k, c in clients.items()}
    finally:
        for c in consumers.values():
            c.stop()
        for s in servers.values():
            s.stop()
    res: dict[str, dict[str, Any]] = {k: {"consumer_cpu_s": round(cpu1[k] - cpu0[k], 4) if k in cpu1 else None,
               "consumer_cpu_pct": round((cpu1[k] - cpu0[k]) / elapsed * 100, 4) if k in cpu1 else None,
               "redis_cmds_per_s": round(sum(cmds[k].values()) / elapsed, 2),
               "redis_cmds_per_s_by_command": {c: round(v / elapsed, 2) for c, v in sorted(cmds[k].items())},
               "redis_cpu_ms_per_s": round((rcpu1[k] - rcpu0[k]) * 1000 / elapsed, 3)} for k in kinds}
    for k in TRANSPORTS:  # what the consumer adds to a Redis's own background work (serverCron)
        res[k]["redis_cpu_ms_per_s_above_idle"] = round(res[k]["redis_cpu_ms_per_s"] - res["none"]["redis_cpu_ms_per_s"], 3)
    for k in kinds:
        print(f"  idle {k:12s}: consumer {res[k]['consumer_cpu_s']} CPU s in {elapsed:.1f} s, "
              f"redis {res[k]['redis_cmds_per_s']} cmds/s {res[k]['redis_cmds_per_s_by_command']}, "
              f"redis CPU {res[k]['redis_cpu_ms_per_s']} ms/s", flush=True)

    def row(metric: str, unit: str, key: str, ratio: bool = True) -> Row:
        d, k, nw = res["dspex"][key], res["kombu"][key], res["dspex-nowake"][key]
        return Row("idle", metric, unit, d, k, d / k if k and ratio else None, nowake=nw)

    base = res["none"]["redis_cmds_per_s"], res["none"]["redis_cpu_ms_per_s"]
    rows = [row(f"consumer CPU seconds over {elapsed:.0f} s idle", "s", "consumer_cpu_s"),
            row(f"Redis commands/s caused (no consumer: {base[0]})", "cmds/s", "redis_cmds_per_s"),
            # separate servers whose own background CPU differs by a few tenths of a ms/s: no ratio
            row(f"Redis server CPU (a Redis with no consumer: {base[1]:.2f} ms/s)", "ms/s", "redis_cpu_ms_per_s",
                ratio=False)]
    return Outcome(rows, {"window_s": round(elapsed, 2), "by_transport": res})


# -- mode 4: ack latency ----------------------------------------------------------------------
ACK_VARIANTS: tuple[tuple[str, str, bool, int, tuple[str, ...]], ...] = (
    # (label, ack mode, hub waker, messages per run = --ack-n // this, transports)
    ("ack in callback", "callback", True, 1, TRANSPORTS),
    ("threads pool: hub.call_soon from the task thread", "threads", True, 1, TRANSPORTS),
    # without the waker kombu's loop sleeps up to 1 s before an ack: fewer messages
    ("threads pool, hub waker off (a kombu Hub without it)", "threads", False, 10, TRANSPORTS),
)


def mode_ack(args: argparse.Namespace, log_dir: Path) -> Outcome:
    kombu = _kombu()
    lat: dict[tuple[str, str], list[float]] = {}
    with private_redis() as server:
        client = _client(server.url)
        with kombu.Connection(server.url, transport="redis") as pub_conn:
            producer = kombu.Producer(pub_conn.default_channel)
            for r in range(args.rounds_ack):
                for label, ack, waker, divisor, transports in ACK_VARIANTS:
                    n = max(4, args.ack_n // divisor)
                    for transport in order(r, transports):
                        queue = f"bench.fetch.ack.{uuid.uuid4().hex[:6]}"
                        kombu.Queue(queue, routing_key=queue)(pub_conn.default_channel).declare()
                        consumer = Consumer(server.url, queue, transport, log_dir, n=n, prefetch=1, ack=ack,
                                            task_ms=args.task_ms, waker=waker, pace=True)
                        try:
                            consumer.wait_for("ready", 30)
                            time.sleep(0.3)  # let it settle into its idle fetch cycle
                            for i in range(n):
                                producer.publish({"id": i}, routing_key=queue, serializer="json")
                                if client.blpop([f"{queue}:acked"], timeout=10) is None:
                                    raise TimeoutError(f"{transport}: message {i} not acked within 10 s")
                                time.sleep(random.uniform(0, args.task_ms / 2000))
                            res = consumer.result(timeout_s=30)
                        finally:
                            consumer.stop()
                        client.delete(queue, f"{queue}:acked")
                        lat.setdefault((label, transport), []).extend(res["latencies_ms"])
                        xs = res["latencies_ms"]
                        print(f"  ack round {r + 1}/{args.rounds_ack} {label[:28]:28s} {transport:12s}: "
                              f"p50 {pct(xs, 0.5):7.2f} ms, p95 {pct(xs, 0.95):7.2f} ms (n={len(xs)})", flush=True)
    rows = []
    for label, _ack, _waker, _divisor, transports in ACK_VARIANTS:
        for q, name in ((0.5, "p50"), (0.95, "p95")):
            d, k = pct(lat[label, "dspex"], q), pct(lat[label, "kombu"], q)
            nw = pct(lat[label, "dspex-nowake"], q) if "dspex-nowake" in transports else None
            rows.append(Row("ack", f"{label}: {name} (n={len(lat[label, 'dspex'])})", "ms", d, k,
                            d / k if k else None, nowake=nw))
    details = {f"{label} | {t}": {"n": len(v), "p50_ms": pct(v, 0.5), "p95_ms": pct(v, 0.95), "max_ms": max(v)}
               for (label, t), v in lat.items()}
    return Outcome(rows, {"task_ms": args.task_ms, "by_variant": details})


# -- output ------------------------------------------------------------------------------------
def fmt(value: float | None, unit: str) -> str:
    if value is None or value != value:
        return "—"
    if unit in ("msgs/s", "tasks/s"):
        return f"{value:,.0f} {unit}"
    if unit == "µs":
        return f"{value:,.0f} µs"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "cmds":
        return f"{value:.2f}"
    if unit in ("ms", "ms/s"):
        return f"{value:.3f} {unit}" if abs(value) < 10 else f"{value:,.1f} {unit}"
    return f"{value:,.2f} {unit}".strip()


COLUMNS = ("mode", "metric", "dspex", "kombu", "dspex/kombu", "dspex, no 50 ms timer", "per-round ratios")


def table_rows(rows: list[Row]) -> list[tuple[str, ...]]:
    return [(r.mode, r.metric, fmt(r.dspex, r.unit), fmt(r.kombu, r.unit),
             "—" if r.ratio is None or r.ratio != r.ratio else f"{r.ratio:.2f}", fmt(r.nowake, r.unit),
             ", ".join(f"{x:.2f}" for x in r.rounds) or "—") for r in rows]


def render(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("mode", "metric", "per-round ratios") else "right")
    for values in table_rows(rows):
        table.add_row(*values)
    Console(width=190).print(table)


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---:|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(v.replace("|", "/") for v in values) + " |" for values in table_rows(rows)]
    return "\n".join(lines)


RUNNERS: dict[str, Callable[[argparse.Namespace, Path], Outcome]] = {
    "throughput": mode_throughput, "celery": mode_celery, "idle": mode_idle, "ack": mode_ack}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short run (< 1 min)")
    parser.add_argument("--json", action="store_true", help="print a JSON document at the end")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {MODES}")
    parser.add_argument("--rounds", type=int, default=None, help="throughput rounds (default 3, quick 2)")
    parser.add_argument("--celery-rounds", type=int, default=None, help="celery rounds (default 3, quick 2)")
    parser.add_argument("--n", type=int, default=None, help="messages per throughput run (default 4000, quick 2000)")
    parser.add_argument("--prefetch", type=int, default=10, help="throughput consumer's prefetch")
    parser.add_argument("--body-bytes", default="0,32768", help="throughput: padding in each message body, "
                        "comma-separated sizes, one set of rounds each (default 0,32768)")
    parser.add_argument("--celery-n", type=int, default=None, help="no-op tasks per celery run, qa gets half "
                        "(default 2000, quick 400)")
    parser.add_argument("--idle-s", type=float, default=None, help="idle window (default 20, quick 5)")
    parser.add_argument("--ack-n", type=int, default=None, help="messages per ack run, a tenth with the waker off "
                        "(default 50, quick 20)")
    parser.add_argument("--rounds-ack", type=int, default=None, help="ack rounds (default 2, quick 1)")
    parser.add_argument("--task-ms", type=float, default=40.0, help="threads ack mode: longest task sleep")
    ns = parser.parse_args(argv)
    ns.selected = [s.strip() for s in ns.modes.split(",") if s.strip()]
    unknown = [s for s in ns.selected if s not in RUNNERS]
    if unknown or not ns.selected:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(RUNNERS)}")
    q = ns.quick
    ns.n = ns.n or (2000 if q else 4000)
    ns.body_sizes = [int(x) for x in str(ns.body_bytes).split(",") if x.strip()]
    ns.celery_n = ns.celery_n or (400 if q else 2000)
    ns.idle_s = ns.idle_s or (5.0 if q else 20.0)
    ns.ack_n = ns.ack_n or (20 if q else 50)
    ns.rounds_ack = ns.rounds_ack or (1 if q else 2)
    ns.rounds = ns.rounds or (2 if q else 3)
    ns.celery_rounds = ns.celery_rounds or (2 if q else 3)
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
    outcomes: dict[str, Outcome] = {}
    failed: dict[str, str] = {}
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    try:
        for name in args.selected:
            print(f"[{name}]", flush=True)
            t0 = time.perf_counter()
            try:
                outcomes[name] = RUNNERS[name](args, log_dir)
            except Exception as exc:  # noqa: BLE001 - one broken mode must not sink the rest
                failed[name] = f"failed: {exc!s:.300}"
                print(f"  {name} failed: {exc!s:.2000}", file=sys.stderr, flush=True)
            finally:
                cleanup_all()
            timings[name] = round(time.perf_counter() - t0, 1)
            print(f"  ({timings[name]} s)", flush=True)
    except KeyboardInterrupt:
        print("interrupted; stopping consumers, workers and Redis", file=sys.stderr)
        return 130
    finally:
        cleanup_all()
    total_s = round(time.perf_counter() - t_start, 1)
    rows = [row for o in outcomes.values() for row in o.rows]
    rows += [Row(name, reason, "", None, None) for name, reason in failed.items()]
    render(rows, f"reliable fetch (dspex) vs kombu's Redis transport ({'quick' if args.quick else 'default'} run, "
                 f"{total_s} s); dspex/kombu: median of the per-round ratios where listed, else of pooled values")
    if args.markdown:
        print(markdown(rows))
    if args.json:
        doc = {"command": command, "machine": machine, "quick": args.quick, "total_s": total_s, "mode_s": timings,
               "failed": failed, "args": {k: v for k, v in vars(args).items() if k != "selected"},
               "modes": {k: {"rows": [asdict(r) for r in o.rows], "details": o.details} for k, o in outcomes.items()}}
        print(json.dumps(doc, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_consume":
        url, queue, transport, n, prefetch, ack, task_ms, waker, pace = sys.argv[2:11]
        consume(url, queue, transport, int(n), int(prefetch), ack, float(task_ms), waker == "1", pace == "1")
    else:
        sys.exit(main())
