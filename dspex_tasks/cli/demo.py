"""``dspex demo``: real worker processes serving the reference signatures and programs, end to end, then a clean exit.

It uses ``DSPEX_REDIS_URL`` when that Redis answers, else a private
redis-server; starts N ``celery worker`` processes; stores a few versioned
session programs; submits a realistic batch across sessions and signatures;
prints results and throughput; then serves two reference programs (a RAG program and a ReAct
agent) across sessions, one session on a stored program version; and stops everything it started, also on Ctrl-C,
SIGTERM or an error. With ``DSPEX_LM`` set the workers call that LM (the
environment is passed through).

Everything runs under a fresh namespace and queue (``demo-<run id>``), so a
configured Redis shared with real workers is neither read nor disturbed, and
its demo keys are removed at the end. The run id is in every worker's node
name (``demo<i>-<run id>@host``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .. import keys
from ..errors import DspexError
from ..worker.procs import PACKAGE_ROOT, WorkerGroup, celery_worker_argv, ping_names, worker_env
from . import demo_data
from .common import esc, preview, redacted_url

__all__ = ["run_demo"]

DEMO_SIGNATURES = ("qa", "classify", "summarize", "complex_analysis")
DEMO_PROGRAMS = ("rag", "agent")  # signatures/programs/: composed modules, served the same way
_READY_TIMEOUT_S = 90.0
_STOP_TIMEOUT_S = 10.0


def run_demo(*, workers: int = 2, tasks: int = 200, sessions: int = 8, concurrency: int = 32,
             timeout_s: float = 120.0, run_id: str | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run the demo and return its summary.

    Args:
        workers: worker OS processes (``--pool threads``).
        tasks: predictions to submit, spread over signatures and sessions.
        sessions: distinct sessions the tasks use.
        concurrency: threads per worker process.
        timeout_s: how long to wait for all results once submitted.
        run_id: names the demo's namespace, queue and worker nodes (random by default).
        console: where to print (stdout by default).

    Returns:
        ``{"tasks", "ok", "failed", "seconds", "tasks_per_s", "redis": "private" | "configured", "workers",
        "run_id", "lm", "programs": {"jobs", "ok", "stored_version"}}``.

    Raises:
        ConfigurationError: no Redis could be started, or the workers did not come up.
        KeyboardInterrupt: on Ctrl-C or SIGTERM, after everything was stopped.
    """
    from ..settings import load_settings
    from ..testing.redis_server import RedisServer, redis_reachable

    out = console or Console(highlight=False)
    run_id = run_id or uuid.uuid4().hex[:8]
    namespace, queue = f"demo-{run_id}", f"dspex.demo-{run_id}"
    names = [f"demo{i}-{run_id}" for i in range(workers)]
    session_ids = demo_data.session_names(sessions)
    configured = os.environ.get("DSPEX_REDIS_URL")
    log_dir = tempfile.mkdtemp(prefix=f"dspex-demo-{run_id}-")
    server = group = client = None
    jobs: list[tuple[str, str, Any]] = []
    with _sigterm_as_interrupt():
        try:
            if configured and redis_reachable(configured):
                url = configured
                out.print(f"[bold]●[/] Redis: configured, {redacted_url(url)} (namespace {namespace})")
            else:
                server = RedisServer().start()
                url = server.url
                note = f" ({redacted_url(configured)} did not answer)" if configured else ""
                out.print(f"[bold]●[/] Redis: private redis-server on port {server.port}, pid {server.pid}{note}")
            settings = load_settings(redis_url=url, broker_url=None, result_backend=None, namespace=namespace,
                                     predict_queue=queue)
            env = _env(url, namespace, queue, settings.modules, concurrency)
            argv = {n: celery_worker_argv(hostname=f"{n}@%h", queues=[queue], pool="threads", concurrency=concurrency,
                                          loglevel="WARNING", extra=["--without-mingle", "--without-gossip"])
                    for n in names}
            from ..client import Client

            client = Client(settings=settings)
            t0 = time.monotonic()
            group = WorkerGroup(argv, env=env, cwd=PACKAGE_ROOT, log_dir=log_dir).start()
            c = client
            group.wait(lambda: {*DEMO_SIGNATURES, *DEMO_PROGRAMS} <= set(c.signatures(refresh=True))
                       and set(names) <= ping_names(c.app), timeout_s=_READY_TIMEOUT_S)
            out.print(f"[bold]●[/] workers: {workers} × {concurrency} threads, LM {settings.lm}, "
                      f"ready in {time.monotonic() - t0:.1f} s (pids {', '.join(map(str, group.pids.values()))})")
            _store_programs(client, session_ids, out)
            results, seconds = _run_batch(client, tasks, session_ids, timeout_s, out, jobs)
            ok = sum(1 for _, _, r in results if not isinstance(r, BaseException))
            summary: dict[str, Any] = {"tasks": tasks, "ok": ok, "failed": tasks - ok, "seconds": round(seconds, 3),
                       "tasks_per_s": round(tasks / seconds, 1) if seconds > 0 else 0.0,
                       "redis": "private" if server is not None else "configured", "workers": workers,
                       "run_id": run_id, "lm": settings.lm}
            _report(out, results, summary, concurrency)
            summary["programs"] = _serve_programs(client, session_ids, timeout_s, out, jobs)
        finally:
            _shutdown(out, group, server, client, configured_redis=server is None, jobs=jobs)
            shutil.rmtree(log_dir, ignore_errors=True)
    return summary


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so ``finally`` stops the workers and Redis."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: The reference signatures and programs, as the package ships them (a checkout's ``signatures/``).
REFERENCE = ("dspex_tasks.examples", "dspex_tasks.examples.programs")


def demo_modules(modules: list[str]) -> list[str]:
    """``modules`` without a checkout's ``signatures`` packages: the demo serves the same files as
    :data:`REFERENCE`, and one process must not register the same programs from two module names."""
    return [m for m in modules if m not in ("signatures", "signatures.programs")]


def _env(url: str, namespace: str, queue: str, modules: list[str], concurrency: int) -> dict[str, str]:
    env = worker_env({"DSPEX_REDIS_URL": url, "DSPEX_NAMESPACE": namespace, "DSPEX_PREDICT_QUEUE": queue,
                      "DSPEX_SIGNATURE_MODULES": ",".join(dict.fromkeys([*demo_modules(modules), *REFERENCE])),
                      "DSPEX_WORKER_POOL": "threads", "DSPEX_WORKER_CONCURRENCY": str(concurrency)})
    for var in ("DSPEX_BROKER_URL", "DSPEX_RESULT_BACKEND"):  # the demo keeps everything on one Redis
        env.pop(var, None)
    return env


def _store_programs(client: Any, sessions: list[str], out: Console) -> None:
    """Give a few sessions their own optimized ``qa``/``classify`` programs, with version history."""
    store = client.programs
    notes = []
    s0 = sessions[0]
    store.put(s0, "qa", {"demos": demo_data.QA_DEMOS[:1]}, signature="qa")
    v = store.put(s0, "qa", {"demos": demo_data.QA_DEMOS, "instructions": demo_data.QA_INSTRUCTIONS}, signature="qa")
    notes.append(f"{s0}/qa v{v} ({len(demo_data.QA_DEMOS)} demos)")
    if len(sessions) > 1:
        s1 = sessions[1]
        first = store.put(s1, "qa", {"demos": demo_data.QA_DEMOS[1:2]}, signature="qa")
        second = store.put(s1, "qa", {"demos": demo_data.QA_DEMOS}, signature="qa")
        store.rollback(s1, "qa", first)
        notes.append(f"{s1}/qa v{first} (rolled back from v{second})")
    if len(sessions) > 2:
        v = store.put(sessions[2], "classify", {"demos": demo_data.CLASSIFY_DEMOS}, signature="classify")
        notes.append(f"{sessions[2]}/classify v{v}")
    out.print(f"[bold]●[/] programs: {', '.join(notes)}; other sessions use the base programs (v0)")


def _run_batch(client: Any, tasks: int, sessions: list[str], timeout_s: float, out: Console,
               jobs: list[tuple[str, str, Any]]) -> tuple[list[tuple[str, str, Any]], float]:
    """Submit ``tasks`` predictions (recorded in ``jobs``) and collect them in order."""
    results: list[tuple[str, str, Any]] = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=out) as progress:
        t0 = time.monotonic()
        submitting = progress.add_task("submitting", total=tasks)
        for i in range(tasks):
            sig = DEMO_SIGNATURES[i % len(DEMO_SIGNATURES)]
            session = sessions[(i // len(DEMO_SIGNATURES)) % len(sessions)]
            jobs.append((sig, session, client.submit(sig, demo_data.inputs_for(sig, i), session=session)))
            progress.advance(submitting)
        running = progress.add_task("running", total=tasks)
        deadline = time.monotonic() + timeout_s
        for sig, session, job in jobs:
            try:
                res: Any = job.get(timeout=max(0.1, deadline - time.monotonic()))
            except DspexError as exc:
                res = exc
            results.append((sig, session, res))
            progress.advance(running)
        seconds = time.monotonic() - t0
    return results, seconds


def _serve_programs(client: Any, sessions: list[str], timeout_s: float, out: Console,
                    jobs: list[tuple[str, str, Any]]) -> dict[str, Any]:
    """RAG and agent jobs across sessions; the first session's RAG runs a stored version (its demos)."""
    predictors = client.signatures()["rag"]["predictors"]
    version = client.programs.put(sessions[0], "rag", {p: {"demos": demo_data.RAG_DEMOS} for p in predictors})
    plan = [(name, sessions[i % min(4, len(sessions))], demo_data.inputs_for(name, i))
            for name, count in (("rag", 8), ("agent", 4)) for i in range(count)]
    start = len(jobs)
    for name, session, inputs in plan:
        jobs.append((name, session, client.submit(name, inputs, session=session)))
    table = Table(title=f"programs (rag: {sessions[0]} on stored v{version}, predictors {', '.join(predictors)})",
                  title_justify="left")
    for col in ("program", "session", "version", "LM calls", "ms"):
        table.add_column(col, justify="left" if col in ("program", "session") else "right", no_wrap=True)
    table.add_column("output", no_wrap=True, overflow="ellipsis", max_width=max(20, out.width - 56))
    deadline = time.monotonic() + timeout_s
    ok = 0
    for name, session, job in jobs[start:]:
        try:
            res = job.get(timeout=max(0.1, deadline - time.monotonic()))
        except DspexError as exc:
            table.add_row(name, session, "-", "-", "-", f"[red]{type(exc).__name__}: {esc(preview(str(exc), 70))}[/]")
            continue
        ok += 1
        text = ", ".join(f"{k}={preview(v, 60)}" for k, v in res.outputs.items())
        table.add_row(name, session, f"v{res.program_version}", str(res.usage.get("lm_calls", "-")),
                      f"{res.duration_ms:.0f}", esc(text))
    out.print(table)
    return {"jobs": len(plan), "ok": ok, "stored_version": version}


def _shutdown(out: Console, group: WorkerGroup | None, server: Any, client: Any, *, configured_redis: bool,
              jobs: list[tuple[str, str, Any]]) -> None:
    """Stop what the demo started; a second Ctrl-C must not cut this short and leave orphans."""
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        stopped = []
        if group is not None:
            codes = group.stop(timeout_s=_STOP_TIMEOUT_S)
            stopped.append(_plural(len(codes), "worker"))
        if client is not None:
            with contextlib.suppress(Exception):
                _release_results(client, jobs)
                if configured_redis:
                    _remove_demo_keys(client, jobs)
            client.close()
        if server is not None:
            server.stop()
            stopped.append("private Redis")
        if stopped:
            out.print(f"[bold]●[/] stopped {' and '.join(stopped)}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _release_results(client: Any, jobs: list[tuple[str, str, Any]]) -> None:
    """Unsubscribe from results never collected (after Ctrl-C) while Redis is still up.

    Otherwise each pending result unsubscribes when garbage-collected at exit, after a private
    Redis is gone, and celery retries for seconds and prints a traceback.
    """
    client.release_results(client.app.AsyncResult(job.id) for _, _, job in jobs)


def _remove_demo_keys(client: Any, jobs: list[tuple[str, str, Any]]) -> None:
    """Leave a configured Redis as it was: the demo's namespace, results and queue."""
    from kombu.entity import Exchange, Queue

    # Every key of ours starts with "<namespace>:" (keys.py); this namespace is the run's own.
    doomed = list(client.redis.scan_iter(match=keys.namespace_pattern(client.settings.namespace), count=1000))
    for i in range(0, len(doomed), 500):
        client.redis.delete(*doomed[i:i + 500])
    for _, _, job in jobs:
        job.forget()
    queue = client.settings.predict_queue
    with client.app.connection_for_write() as conn:
        bound = Queue(queue, Exchange(queue), routing_key=queue)(conn.default_channel)  # type: ignore[no-untyped-call]
        bound.declare()  # type: ignore[no-untyped-call]  # makes the binding known, so delete() removes it
        bound.delete()  # type: ignore[no-untyped-call]


def _report(out: Console, results: list[tuple[str, str, Any]], summary: dict[str, Any], concurrency: int) -> None:
    shown: set[tuple[str, str]] = set()
    table = Table(title="sample results (one per signature and session)", title_justify="left")
    for col in ("signature", "session", "version", "ms"):
        table.add_column(col, justify="right" if col in ("version", "ms") else "left", no_wrap=True)
    # Capped, or rich squeezes the short columns to nothing to make room for it.
    table.add_column("output", no_wrap=True, overflow="ellipsis", max_width=max(20, out.width - 50))
    for sig, session, res in results:
        if (sig, session) in shown or len(shown) >= 12:
            continue
        shown.add((sig, session))
        if isinstance(res, BaseException):
            table.add_row(sig, session, "-", "-", f"[red]{type(res).__name__}: {esc(preview(str(res), 70))}[/]")
        else:
            text = ", ".join(f"{k}={preview(v, 40)}" for k, v in res.outputs.items())
            table.add_row(sig, session, f"v{res.program_version}", f"{res.duration_ms:.0f}", esc(preview(text, 200)))
    out.print(table)
    per_sig: dict[str, list[Any]] = defaultdict(list)
    for sig, _, res in results:
        per_sig[sig].append(res)
    totals = Table(title="per signature", title_justify="left")
    for col in ("signature", "tasks", "ok", "failed", "median ms"):
        totals.add_column(col, justify="left" if col == "signature" else "right")
    for sig, items in per_sig.items():
        good = [r.duration_ms for r in items if not isinstance(r, BaseException)]
        totals.add_row(sig, str(len(items)), str(len(good)), str(len(items) - len(good)),
                       f"{statistics.median(good):.0f}" if good else "-")
    out.print(totals)
    colour = "green" if not summary["failed"] else "yellow"
    out.print(f"[bold {colour}]throughput:[/] {summary['ok']}/{summary['tasks']} tasks ok in {summary['seconds']:.2f} s "
              f"= [bold]{summary['tasks_per_s']} tasks/s[/] ({_plural(summary['workers'], 'worker')} × {concurrency} threads, "
              f"{summary['redis']} Redis, LM {summary['lm']})")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")
