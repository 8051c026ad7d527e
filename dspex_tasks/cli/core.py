"""The ``dspex`` command line: run workers, submit and map predictions, manage programs, inspect, demo.

Heavy imports (celery's worker, dspy) happen inside the commands that need
them, so ``dspex --help`` stays fast. Results go to stdout; errors, notices and
progress bars to stderr. Exit status: 0 ok, 1 failure, 2 invalid input.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.panel import Panel
from rich.table import Table

from ..errors import DspexError, ValidationError
from ..observability.status import collect_status
from .common import (
    EXIT_INVALID,
    cli_errors,
    console,
    echo_json,
    err,
    esc,
    fail,
    json_object,
    open_client,
    preview,
    read_jsonl,
    redacted_url,
)
from .gateway import register as register_gateway_commands
from .jobs import follow as follow_job
from .jobs import register as register_job_commands
from .ops import register as register_ops_commands
from .optimize import register as register_optimize_commands
from .programs import programs_app, sessions_app
from .status import print_status
from .usage import register as register_usage_commands

if TYPE_CHECKING:  # pragma: no cover
    from ..client import Result

__all__ = ["app", "main"]

app = typer.Typer(name="dspex", help="DSPy signatures served as typed Celery tasks on Redis.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False, rich_markup_mode="rich")
app.add_typer(programs_app, name="programs")
app.add_typer(sessions_app, name="sessions")


class Pool(StrEnum):
    threads = "threads"
    prefork = "prefork"
    solo = "solo"


@app.callback()
def _root(
    redis_url: Annotated[str | None, typer.Option("--redis-url", help="Redis URL (sets DSPEX_REDIS_URL).")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", help="Key namespace (sets DSPEX_NAMESPACE).")] = None,
) -> None:
    """DSPy signatures served as typed Celery tasks on Redis. Settings come from DSPEX_* variables."""
    if redis_url:
        os.environ["DSPEX_REDIS_URL"] = redis_url
    if namespace:
        os.environ["DSPEX_NAMESPACE"] = namespace


@app.command()
@cli_errors
def worker(
    queues: Annotated[str | None, typer.Option("--queues", "-Q", help="Comma-separated queues.",
                                               show_default="DSPEX_PREDICT_QUEUE,DSPEX_OPTIMIZE_QUEUE,"
                                                            "DSPEX_BARE_QUEUE")] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", "-c", min=1, help="Threads or processes per "
                                                    "worker.", show_default="DSPEX_WORKER_CONCURRENCY")] = None,
    pool: Annotated[Pool | None, typer.Option("--pool", "-P", help="Execution pool.",
                                              show_default="DSPEX_WORKER_POOL")] = None,
    loglevel: Annotated[str, typer.Option("--loglevel", "-l")] = "INFO",
    hostname: Annotated[str | None, typer.Option("--hostname", "-n", help="Node name.",
                                                 show_default="dspex@%h")] = None,
    processes: Annotated[int, typer.Option(min=1, help="Run N worker OS processes under a small supervisor.")] = 1,
) -> None:
    """Run a Celery worker serving every registered signature (pre-warmed: LM, modules, hot programs)."""
    from ..settings import load_settings

    # Through settings, not only -P/-c: celery treats an explicit "-P prefork" as its default and replaces it
    # with app.conf.worker_pool, which comes from DSPEX_WORKER_POOL.
    overrides = {"worker_pool": pool.value if pool else None, "worker_concurrency": concurrency}
    settings = load_settings(**{k: v for k, v in overrides.items() if v is not None})
    queue_list = [q.strip() for q in queues.split(",") if q.strip()] if queues else settings.queues
    pool_name, threads = settings.worker_pool, settings.worker_concurrency
    node = hostname or "dspex@%h"
    if processes > 1:
        from ..worker.procs import WorkerGroup, celery_worker_argv, supervise, worker_env

        local, _, host = node.partition("@")
        commands = {f"{local}{i}": celery_worker_argv(hostname=f"{local}{i}@{host or '%h'}", queues=queue_list,
                                                      pool=pool_name, concurrency=threads, loglevel=loglevel)
                    for i in range(processes)}
        env = worker_env({"DSPEX_WORKER_POOL": pool_name, "DSPEX_WORKER_CONCURRENCY": str(threads)})
        raise typer.Exit(supervise(WorkerGroup(commands, env=env), report=err.print))
    from ..worker.app import create_worker_app

    celery_app = create_worker_app(settings)
    celery_app.worker_main(["worker", "--loglevel", loglevel, "-Q", ",".join(queue_list), "-n", node,
                            "-P", pool_name, "-c", str(threads)])


def _parse_inputs(pairs: list[str], json_text: str | None, properties: dict[str, Any]) -> dict[str, Any]:
    """``--json`` then ``--input k=v`` pairs; values parse as JSON unless the field is a plain string."""
    data = json_object(json_text, "--json")
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            fail(f"--input expects key=value, got {pair!r}", code=EXIT_INVALID)
        key = key.strip()
        if properties.get(key, {}).get("type") == "string":
            data[key] = raw
            continue
        try:
            data[key] = json.loads(raw)
        except json.JSONDecodeError:
            data[key] = raw
    return data


@app.command()
@cli_errors
def submit(
    name: Annotated[str, typer.Argument(help="Signature name, e.g. qa.")],
    inputs: Annotated[list[str] | None, typer.Option("--input", "-i", help="key=value (repeatable); JSON values "
                                                     "such as 3, [1,2] or {\"a\":1} are parsed.")] = None,
    json_text: Annotated[str | None, typer.Option("--json", help="All inputs as one JSON object.")] = None,
    session: Annotated[str | None, typer.Option("--session", "-s")] = None,
    program: Annotated[str | None, typer.Option("--program", "-p")] = None,
    trace: Annotated[bool, typer.Option("--trace", help="Show each predictor call (inputs, outputs, "
                                                        "reasoning) after the result.")] = False,
    lm_config_text: Annotated[str | None, typer.Option("--lm-config", help="LM settings for this job as a JSON "
                                                       "object: temperature, top_p, max_tokens, n, "
                                                       "rollout_id.")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for and print the result.")] = True,
    timeout: Annotated[float, typer.Option("--timeout", "-t", help="Seconds to wait.")] = 60.0,
    follow: Annotated[bool, typer.Option("--follow", help="Stream the job's live events while it runs "
                                         "(tokens per field, steps and tool calls, on stderr), then print the "
                                         "result.")] = False,
    timeout_s: Annotated[float | None, typer.Option("--timeout-s", help="The job's own time bound from now "
                                                    "(queued time counts): past it, it stops before its next LM "
                                                    "call and fails as Cancelled.")] = None,
) -> None:
    """Validate inputs against the published schema, enqueue one prediction, and (by default) wait for it."""
    if follow and not wait:
        fail("--follow waits for the job: drop --no-wait", code=EXIT_INVALID)
    lm_config = json_object(lm_config_text, "--lm-config") or None
    with open_client() as client:
        published = client.signatures()
        properties = published.get(name, {}).get("input_schema", {}).get("properties", {})
        job = client.submit(name, _parse_inputs(inputs or [], json_text, properties), session=session,
                            program=program, trace=trace, lm_config=lm_config, stream=follow, timeout_s=timeout_s)
        err.print(f"job [bold]{job.id}[/]")
        if not wait:
            typer.echo(job.id)
            return
        res = follow_job(job, timeout=timeout) if follow else job.get(timeout=timeout)
    _print_result(name, res)


def _print_result(name: str, res: Result) -> None:
    """A result as a panel of its outputs (and its trace, when it has one)."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan")
    table.add_column(overflow="fold")
    for field, value in res.outputs.items():
        table.add_row(field, esc(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)))
    usage = res.usage or {}
    footer = (f"program {res.program} v{res.program_version} · {res.duration_ms:.0f} ms · LM {res.lm or '-'} · "
              f"tokens {usage.get('prompt_tokens', '-')}+{usage.get('completion_tokens', '-')}")
    title = f"{name}" + (f" · session {res.session}" if res.session else "")
    console.print(Panel(table, title=title, title_align="left", subtitle=footer, subtitle_align="left"))
    if res.trace is not None:
        _print_trace(res.trace)


def _print_trace(trace: list[dict[str, Any]]) -> None:
    """One panel per predictor call, in order: what it was given and what it answered."""
    if not trace:
        console.print("[dim]trace: no predictor calls[/]")
    for i, call in enumerate(trace, 1):
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column(overflow="fold")
        for side, style in (("inputs", "dim"), ("outputs", "cyan")):
            for field, value in (call.get(side) or {}).items():
                text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
                grid.add_row(f"[{style}]{esc(field)}[/]", esc(text))
        console.print(Panel(grid, title=f"trace {i}/{len(trace)} · {esc(call.get('predictor', '?'))}",
                            title_align="left"))


def _result_json(item: Any) -> dict[str, Any]:
    if isinstance(item, DspexError):
        error: dict[str, Any] = {"type": type(item).__name__, "message": item.message}
        if isinstance(item, ValidationError):
            error["errors"] = item.errors
        return {"error": error}
    return dataclasses.asdict(item)


@app.command("map")
@cli_errors
def map_(
    name: Annotated[str, typer.Argument(help="Signature name.")],
    file: Annotated[Path, typer.Argument(help="JSONL file of input objects ('-' for stdin).", allow_dash=True)],
    session: Annotated[str | None, typer.Option("--session", "-s")] = None,
    program: Annotated[str | None, typer.Option("--program", "-p")] = None,
    chunk_size: Annotated[int | None, typer.Option(min=1, help="Inputs per message.",
                                                   show_default="DSPEX_MAP_CHUNK_SIZE")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write results as JSONL, in input order.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", "-t", help="Seconds to wait for everything.")] = 300.0,
    rows: Annotated[int, typer.Option(help="Results to show.")] = 10,
) -> None:
    """Run every input of a JSONL file through one signature, in few messages; exits 1 if any item failed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    items = read_jsonl(file, " of inputs")
    if not items:
        fail(f"{file} holds no inputs", code=EXIT_INVALID)
    with open_client() as client, Progress(TextColumn(f"{name}"), BarColumn(), MofNCompleteColumn(),
                                           TimeElapsedColumn(), console=err, transient=True) as progress:
        bar = progress.add_task(name, total=len(items))
        t0 = time.monotonic()
        results = client.map(name, items, session=session, program=program, chunk_size=chunk_size, timeout=timeout,
                             return_exceptions=True, on_progress=lambda n: progress.advance(bar, n))
        seconds = time.monotonic() - t0
    if out is not None:
        with out.open("w") as fh:
            for item in results:
                fh.write(json.dumps(_result_json(item), ensure_ascii=False) + "\n")
    failed = sum(1 for r in results if isinstance(r, DspexError))
    table = Table(title=f"first {min(rows, len(results))} of {len(results)}", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("version", justify="right")
    table.add_column("output", no_wrap=True, overflow="ellipsis", max_width=max(20, console.width - 20))
    for i, item in enumerate(results[:rows]):
        if isinstance(item, DspexError):
            table.add_row(str(i), "-", f"[red]{type(item).__name__}: {esc(preview(item.message, 80))}[/]")
        else:
            text = ", ".join(f"{k}={preview(v, 40)}" for k, v in item.outputs.items())
            table.add_row(str(i), f"v{item.program_version}", esc(preview(text, 200)))
    if rows > 0:
        console.print(table)
    rate = len(results) / seconds if seconds > 0 else 0.0
    written = f"; wrote {out}" if out is not None else ""
    console.print(f"{len(results)} items in {seconds:.2f} s ({rate:.1f} items/s): {len(results) - failed} ok, "
                  f"{failed} failed{written}")
    if failed:
        raise typer.Exit(1)


@app.command()
@cli_errors
def signatures(as_json: Annotated[bool, typer.Option("--json", help="Print the published descriptions "
                                                                    "as JSON.")] = False) -> None:
    """List the signatures and programs workers have published (name, kind, predictors, inputs, outputs)."""
    with open_client() as client:
        sigs = client.signatures(refresh=True)
        ns = client.settings.namespace
    if as_json:
        echo_json(sigs)
        return
    if not sigs:
        err.print(f"[yellow]no signatures published in namespace '{ns}'[/]: start a worker (dspex worker)")
        return
    table = Table(title=f"signatures and programs ({len(sigs)})", title_justify="left")
    for col in ("name", "kind", "predictors", "inputs", "outputs"):
        table.add_column(col, overflow="fold")
    for sig_name, desc in sorted(sigs.items()):
        fields = [esc(", ".join(f"{k}: {t}" for k, t in (desc.get(side) or {}).items()))
                  for side in ("input_fields", "output_fields")]
        kind = str(desc.get("kind", "signature"))
        if kind == "signature":
            kind = f"signature ({desc.get('module', '')})"
        table.add_row(sig_name, kind, esc(", ".join(desc.get("predictors") or [])) or "-", *fields)
    console.print(table)


@app.command()
@cli_errors
def status(as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """Workers alive, queue depths, program cache counters, sessions."""
    with open_client() as client:
        data = collect_status(client)
    data["redis_url"] = redacted_url(data["redis_url"])
    if as_json:
        echo_json(data)
    else:
        print_status(data)


@app.command("mock-lm")
@cli_errors
def mock_lm(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one).")] = 8089,
    latency_ms: Annotated[float, typer.Option(min=0, help="Delay before every completion.")] = 0.0,
    error_rate: Annotated[float, typer.Option(min=0, max=1, help="Fraction of completions that fail.")] = 0.0,
    status_code: Annotated[int, typer.Option("--status", help="HTTP status of injected failures.")] = 500,
    seed: Annotated[int, typer.Option(help="Changes every generated value.")] = 0,
) -> None:
    """Serve the OpenAI-compatible mock LM in the foreground until Ctrl-C."""
    from ..testing.mock_server import MockLMServer

    server = MockLMServer(host, port, latency_ms=latency_ms, error_rate=error_rate, status=status_code,
                          seed=seed).start()
    done = threading.Event()
    previous = {s: signal.signal(s, lambda *_: done.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        console.print(f"mock LM listening on [bold]{server.url}[/]  (Ctrl-C to stop)", soft_wrap=True)
        err.print(f"point workers at it: DSPEX_LM=openai/mock DSPEX_LM_API_BASE={server.url} DSPEX_LM_API_KEY=sk-mock",
                  soft_wrap=True)
        while not done.wait(0.5):
            pass
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    err.print(f"stopped; served {server.stats()}")


@app.command()
@cli_errors
def demo(
    workers: Annotated[int, typer.Option(min=1, help="Worker OS processes.")] = 2,
    tasks: Annotated[int, typer.Option(min=1, help="Predictions to run.")] = 200,
    sessions: Annotated[int, typer.Option(min=1, help="Distinct sessions.")] = 8,
    concurrency: Annotated[int, typer.Option(min=1, help="Threads per worker.")] = 32,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the results.")] = 120.0,
) -> None:
    """Start Redis (if needed) and workers, run a realistic batch, print throughput, and clean up."""
    from .demo import run_demo

    summary = run_demo(workers=workers, tasks=tasks, sessions=sessions, concurrency=concurrency, timeout_s=timeout,
                       console=console)
    if summary["failed"]:
        raise typer.Exit(1)


register_job_commands(app)  # cancel
register_optimize_commands(app)  # optimize, datasets, runs, schedule, beat
register_gateway_commands(app)  # gateway, keys
register_ops_commands(app)  # flower, health
register_usage_commands(app)  # usage


def main() -> None:
    """Entry point of the ``dspex`` script and ``python -m dspex_tasks``.

    The current directory goes first on ``sys.path``, as ``celery -A`` puts it, so a project's own modules
    (its ``signatures`` package, ``DSPEX_SIGNATURE_MODULES``) are found the same way by both commands.
    """
    import os
    import sys

    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    app(prog_name="dspex")
