"""``dspex optimize``, ``datasets``, ``runs``, ``schedule`` and ``beat``: optimization runs from the shell.

Results on stdout, progress and notices on stderr; exit 0 ok, 1 failure (a failed or cancelled run too), 2 bad input.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import RenderableType
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..errors import DatasetNotFound, DspexError, NotFound, RunNotFound, UnknownSignature, ValidationError, from_remote
from ..optimize.runs import RunRecord
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
)

__all__ = ["register", "datasets_app", "runs_app", "schedule_app", "optimize", "beat", "parse_params", "runs_table"]

datasets_app = typer.Typer(help="Named training datasets: put, ls, show, rm.", no_args_is_help=True)
runs_app = typer.Typer(help="Optimization runs: ls, show, compare, cancel, plot.", no_args_is_help=True)
schedule_app = typer.Typer(help="Scheduled re-optimizations (started by dspex beat): add, ls, rm.", no_args_is_help=True)

_END = ("done", "failed", "cancelled")
_COLORS = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}
ParamOpt = Annotated[list[str] | None, typer.Option("--param", help="Optimizer param key=value (repeatable); "
                                                    "JSON values such as 3 or true are parsed, else strings.")]
ParamsOpt = Annotated[str | None, typer.Option("--params", help="All params as one JSON object (--param wins).")]
MetricOpt = Annotated[str, typer.Option("--metric", "-m", help="Metric name (exact_match, contains, f1, ...).")]
OptimizerOpt = Annotated[str, typer.Option("--optimizer", "-O", help="Optimizer name (bootstrap_few_shot, "
                                           "bootstrap_few_shot_with_random_search, miprov2, ...).")]
DatasetName = Annotated[str, typer.Argument(help="Dataset name (1-128 chars of [A-Za-z0-9._:-]).")]
RunId = Annotated[str, typer.Argument(help="Run id (from dspex optimize or dspex runs ls).")]


def register(app: typer.Typer) -> None:
    """Add ``optimize``, ``beat`` and the ``datasets``, ``runs`` and ``schedule`` groups to the root app."""
    app.command()(optimize)
    app.add_typer(datasets_app, name="datasets")
    app.add_typer(runs_app, name="runs")
    app.add_typer(schedule_app, name="schedule")
    app.command()(beat)


def parse_params(pairs: list[str] | None, json_text: str | None) -> dict[str, Any]:
    """``--params`` (a JSON object), then ``--param k=v`` pairs: values parse as JSON when they can."""
    params = json_object(json_text, "--params")
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            fail(f"--param expects key=value, got {pair!r}", code=EXIT_INVALID)
        try:
            params[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[key.strip()] = raw
    return params


def _num(value: Any, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def _when(ts: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts))) if ts else "-"


def _duration(rec: dict[str, Any]) -> float:
    if (rec.get("summary") or {}).get("duration_s") is not None:
        return float(rec["summary"]["duration_s"])
    start, end = rec.get("started_at") or rec["created_at"], rec.get("finished_at") or time.time()
    return float(end) - float(start)


def _grid(rows: Iterable[tuple[str, Any]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value if isinstance(value, Text) else esc(value))
    return table


def _gain(s: dict[str, Any]) -> str:
    """``+0.333 (95% interval [+0.000, +1.000] over 3 examples, required)``, or ``-`` for an older summary."""
    if s.get("gain") is None:
        return "-"
    if not s.get("gain_ci"):
        return f"{s['gain']:+.3f}"
    (lo, hi), level = s["gain_ci"], float(s.get("confidence") or 0.95) * 100
    return (f"{s['gain']:+.3f} ({level:g}% interval [{lo:+.3f}, {hi:+.3f}] over {s.get('n_val')} examples, "
            f"{'required' if s.get('confidence_required') else 'reported'})")


def _spend(rec: dict[str, Any]) -> str:
    """``1,234 prompt + 210 completion tokens · $0.000321`` (the run's record: what it spent so far)."""
    prompt, completion = int(rec.get("prompt_tokens") or 0), int(rec.get("completion_tokens") or 0)
    cost = float(rec.get("cost_usd") or 0.0)
    return f"{prompt:,} prompt + {completion:,} completion tokens · ${cost:.6f}" + ("" if cost else " (unpriced model)")


def _summary_panel(run_id: str, rec: dict[str, Any]) -> Panel:
    s = rec.get("summary") or {}
    promoted = Text("yes", style="bold green") if s.get("promoted") else \
        Text("no (dry run: no session)" if s.get("dry_run") else "no", style="yellow")
    rows = [("baseline_score", _num(s.get("baseline_score"))), ("score", _num(s.get("score"))),
            ("gain", _gain(s)), ("promoted", promoted), ("program_version", s.get("program_version", "-")),
            ("reason", s.get("reason", "-")), ("lm_calls", s.get("lm_calls", rec.get("lm_calls", "-"))),
            ("spend", _spend(rec)), ("duration", f"{_duration(rec):.1f} s")]
    return Panel(_grid(rows), title=esc(f"run {run_id} · {rec.get('signature')} · {rec.get('optimizer')}"),
                 subtitle=esc(f"session {rec.get('session') or '-'} · program {rec.get('program')}"),
                 title_align="left", subtitle_align="left", expand=False)


def _run_error(rec: dict[str, Any]) -> DspexError:
    error = rec.get("error") or {}
    return from_remote(error.get("type", "DspexError"), error.get("args", ["run failed"]))


class _RunProgress(Progress):
    """A progress display with one bar per stage and a status line (best score, LM calls) below."""

    status_line: str = ""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.status_line:
            yield Text.from_markup(self.status_line)


def _follow(run: Any, timeout: float | None) -> None:
    """Render ``run.events()`` live on stderr until the run ends."""
    progress = _RunProgress(TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[note]}"), console=err)
    bars: dict[str, TaskID] = {}
    scores: dict[str, float] = {}
    lm_calls, last_message = 0, ""
    with progress:
        for event in run.events(timeout=timeout):
            stage, done, total = str(event.get("stage")), int(event.get("done") or 0), event.get("total")
            lm_calls = max(lm_calls, int(event.get("lm_calls") or 0))
            if event.get("score") is not None and stage not in _END:  # the end event repeats the candidate's
                scores[stage] = float(event["score"])
                progress.console.print(f"  {esc(stage)} score [bold]{scores[stage]:.3f}[/]")
            message = str(event.get("message") or "")
            if message and message != last_message:
                progress.console.print(f"[dim]{esc(stage)}:[/] {esc(message)}")
                last_message = message
            if stage not in _END and stage != "queued":
                if stage not in bars:
                    for tid in bars.values():  # an earlier stage is over once a later one starts
                        progress.update(tid, total=(n := progress.tasks[tid].total or 1), completed=n)
                    bars[stage] = progress.add_task(stage, total=total, note="")
                progress.update(bars[stage], total=total, completed=done,
                                note=esc(preview(message, 50)) if message else progress.tasks[bars[stage]].fields["note"])
            best = max(scores.values()) if scores else None
            progress.status_line = (f"best score [bold]{_num(best)}[/] · baseline {_num(scores.get('baseline'))} · "
                                    f"candidate {_num(scores.get('candidate'))} · LM calls {lm_calls}")


@cli_errors
def optimize(
    name: Annotated[str, typer.Argument(help="Signature to optimize, e.g. qa.")],
    trainset: Annotated[Path | None, typer.Option(help="JSONL rows: inputs and labels.", allow_dash=True)] = None,
    valset: Annotated[Path | None, typer.Option(help="JSONL rows (default: params.val_fraction held out).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="A stored dataset instead.")] = None,
    metric: MetricOpt = "exact_match", optimizer: OptimizerOpt = "bootstrap_few_shot",
    session: Annotated[str | None, typer.Option("--session", "-s", help="Session to promote into.")] = None,
    program: Annotated[str | None, typer.Option("--program", "-p", show_default="NAME")] = None,
    param: ParamOpt = None, params: ParamsOpt = None,
    follow: Annotated[bool, typer.Option(help="Show live progress and the summary, else print the run id.")] = True,
    timeout: Annotated[float | None, typer.Option("--timeout", "-t", help="Seconds to follow (the run goes on).",
                                                  show_default="no limit")] = None,
) -> None:
    """Start an optimization run: baseline, compile, candidate; promote the candidate if it scores higher.

    Rows hold the inputs and at least one output (the label). Without --session it is a dry run: nothing is
    promoted; `dspex runs show RUN --candidate` prints the candidate's state.
    Exits 0 when the run succeeded (promoted or not), 1 when it failed or was cancelled, 2 on invalid input.
    """
    if (trainset is None) == (dataset is None):
        fail("give either --trainset FILE.jsonl or --dataset NAME", code=EXIT_INVALID)
    train_rows, val_rows = (read_jsonl(path) if path is not None else None for path in (trainset, valset))
    run_params = parse_params(param, params)
    with open_client() as client:
        run = client.optimize(name, train_rows, val_rows, metric=metric, optimizer=optimizer, session=session,
                              program=program, params=run_params, dataset=dataset)
        if not follow:
            err.print(f"run [bold]{run.id}[/] started; follow with [bold]dspex runs show {run.id}[/]")
            typer.echo(run.id)
            return
        err.print(f"run [bold]{run.id}[/] · {esc(optimizer)} on {esc(name)} · metric {esc(metric)} "
                  f"[dim](Ctrl-C stops following, not the run: dspex runs cancel {run.id})[/]")
        _follow(run, timeout)
        rec = run.status()
    if rec["status"] == "succeeded":
        console.print(_summary_panel(run.id, rec))
        if (rec.get("summary") or {}).get("dry_run"):
            err.print(f"keep the candidate: [bold]dspex runs show {run.id} --candidate | "
                      f"dspex programs put SESSION {esc(rec.get('program'))} -[/]")
        return
    if rec["status"] == "cancelled":
        fail(f"run {run.id} was cancelled; the session's program is untouched")
    exc = _run_error(rec)
    fail(f"run {run.id} failed: {type(exc).__name__}: {exc.message}",
         fields=exc.errors if isinstance(exc, ValidationError) else None)


@datasets_app.command("put")
@cli_errors
def datasets_put(name: DatasetName, file: Annotated[Path, typer.Argument(
        help="JSONL rows, or a JSON array such as dumped dspy.Example objects ('-' for stdin).",
        allow_dash=True)]) -> None:
    """Store the rows of FILE under NAME (replacing it).

    Each row's interface inputs are inputs; every other field is a label the metric sees.
    """
    rows = read_jsonl(file)
    if not rows:
        fail(f"{file} holds no rows", code=EXIT_INVALID)
    with open_client() as client:
        n = client.datasets.put(name, rows)
    console.print(f"stored dataset [bold]{esc(name)}[/] ({n} rows)")


@datasets_app.command("ls")
@cli_errors
def datasets_ls() -> None:
    """List datasets with their row counts."""
    with open_client() as client:
        counts = {name: len(client.datasets.get(name)) for name in client.datasets.list()}
        if not counts:
            err.print(f"no datasets in namespace '{client.settings.namespace}'")
            return
    table = Table(title=f"datasets ({len(counts)})", title_justify="left")
    table.add_column("dataset")
    table.add_column("rows", justify="right")
    for name, n in counts.items():
        table.add_row(esc(name), str(n))
    console.print(table)


@datasets_app.command("show")
@cli_errors
def datasets_show(name: DatasetName,
                  limit: Annotated[int, typer.Option("--limit", "-n", min=0, help="Rows to show.")] = 5) -> None:
    """Print the first rows of a dataset as JSONL (stdout), with a header on stderr."""
    with open_client() as client:
        if name not in client.datasets.list():
            raise DatasetNotFound(f"no dataset '{name}'")
        rows = client.datasets.get(name)
    err.print(f"[bold]{esc(name)}[/]: first {min(limit, len(rows))} of {len(rows)} rows")
    for row in rows[:limit]:
        typer.echo(json.dumps(row, ensure_ascii=False))


@datasets_app.command("rm")
@cli_errors
def datasets_rm(name: DatasetName) -> None:
    """Delete a dataset."""
    with open_client() as client:
        if name not in client.datasets.list():
            raise DatasetNotFound(f"no dataset '{name}'")
        client.datasets.delete(name)
    console.print(f"removed dataset {esc(name)}")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(0, int(seconds))}s"


def _status(rec: RunRecord) -> Text:
    """The status, and for a finished run what became of the program: promoted, unchanged or dry run."""
    text = Text(str(rec.status), style=_COLORS.get(rec.status, ""))
    s = rec.summary or {}
    if "promoted" in s:
        outcome = ("dry run", "dim") if s.get("dry_run") else ("promoted", "green") if s["promoted"] else \
            ("unchanged", "yellow")
        text.append("\n" + outcome[0], style=outcome[1])
    return text


def runs_table(records: Iterable[RunRecord], *, now: float, width: int = 80) -> Table:
    """The ``runs ls`` table: fits ``width`` columns (80 and up) with the run id whole on one line.

    Always: run id, signature (``/program`` when it differs) above its optimizer, status (and what became
    of the program), score baseline→candidate, age. Session, LM calls and duration join from 120 columns.
    """
    records = list(records)
    wide = width >= 120
    table = Table(title=f"optimization runs ({len(records)})", title_justify="left", box=None, pad_edge=False,
                  padding=(0, 1), header_style="bold underline")
    table.add_column("run id", no_wrap=True, min_width=32)
    table.add_column("signature/optimizer", overflow="fold", min_width=8)
    if wide:
        table.add_column("session", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("score", justify="right", no_wrap=True)
    if wide:
        table.add_column("lm calls", justify="right", no_wrap=True)
        table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("age", justify="right", no_wrap=True)
    for rec in records:
        what = Text(rec.signature + (f"/{rec.program}" if rec.program and rec.program != rec.signature else ""))
        what.append("\n" + rec.optimizer, style="dim")
        cand = (rec.summary or {}).get("score", rec.candidate_score)
        score = "-" if rec.baseline_score is None and cand is None else \
            f"{_num(rec.baseline_score, '.2f')}→{_num(cand, '.2f')}"
        cells: list[RenderableType] = [rec.run_id, what]
        if wide:
            cells.append(Text(rec.session or "-"))
        cells += [_status(rec), score]
        if wide:
            cells += [str(rec.lm_calls), f"{_duration(rec.to_json()):.1f} s"]
        cells.append(_age(now - rec.created_at))
        table.add_row(*cells)
    return table


@runs_app.command("ls")
@cli_errors
def runs_ls(session: Annotated[str | None, typer.Option("--session", "-s", help="Only this session's runs.")] = None,
            limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Most recent runs to show.")] = 20,
            as_json: Annotated[bool, typer.Option("--json", help="Print the records as JSON.")] = False) -> None:
    """List optimization runs, newest first, with their scores baseline→candidate."""
    with open_client() as client:
        records = []
        for run_id in client.runs.ids(session, limit):
            with contextlib.suppress(RunNotFound):  # the record expired
                records.append(client.runs.get(run_id))
    if as_json:
        echo_json([rec.to_json() for rec in records])
        return
    if not records:
        err.print("no optimization runs" + (f" for session '{session}'" if session else ""))
        return
    console.print(runs_table(records, now=time.time(), width=console.width))


@runs_app.command("show")
@cli_errors
def runs_show(run_id: RunId, as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
              candidate: Annotated[bool, typer.Option("--candidate", help="Print only the candidate program state "
                                                      "(JSON, for dspex programs put), promoted or not.")] = False,
              ) -> None:
    """Show a run: its record, its summary (once finished) and every event so far."""
    with open_client() as client:
        if candidate:
            echo_json(client.runs.candidate(run_id))
            return
        rec = client.runs.get(run_id).to_json()
        events = list(client.runs.events(run_id, follow=False))
        described = client.signatures().get(rec["signature"]) or {}
        changes = None
        with contextlib.suppress(NotFound):  # no candidate before the compile stage finished
            changes = client.run(run_id).changes(  # a program's own instructions are not its predictors'
                default_instructions=described.get("instructions") if described.get("kind") != "program" else None)
    if as_json:
        echo_json({"record": rec, "summary": rec.get("summary"), "changes": changes, "events": events})
        return
    rows = [(k, _when(v) if k.endswith("_at") else v if isinstance(v, str) else json.dumps(v))
            for k, v in sorted(rec.items()) if k not in ("summary", "trials", "error", "run_id")]
    console.print(Panel(_grid(rows), title=f"run {run_id}", title_align="left"))
    if rec["status"] == "succeeded":
        console.print(_summary_panel(run_id, rec))
    elif rec["status"] == "failed":
        console.print(f"[red]failed:[/] {type(exc := _run_error(rec)).__name__}: {esc(exc.message)}")
    if changes is not None:
        console.print(_changes_table(changes))
    t0 = float(events[0]["ts"]) if events else 0.0
    table = Table(title=f"events ({len(events)})", title_justify="left")
    for col in ("t+s", "stage", "done", "score", "lm_calls", "message"):
        table.add_column(col, justify="left" if col in ("stage", "message") else "right", overflow="fold")
    for e in events:
        table.add_row(f"{float(e.get('ts', t0)) - t0:.2f}", esc(e.get("stage")),
                      f"{e.get('done', 0)}/{'?' if e.get('total') is None else e['total']}", _num(e.get("score")),
                      str(e.get("lm_calls", "")), esc(e.get("message", "")))
    console.print(table)


def _changes_table(changes: list[dict[str, Any]]) -> Table:
    """Per predictor: demos before → after, instructions before → after (shortened)."""
    from ..optimize.compare import change_cells

    n = len(changes)
    table = Table(title=f"changes: baseline → candidate ({n} predictor{'' if n == 1 else 's'})", title_justify="left")
    for col in ("predictor", "demos", "instructions"):
        table.add_column(col, justify="right" if col == "demos" else "left", overflow="fold")
    for c in changes:
        table.add_row(esc(c["predictor"]), *(esc(cell) for cell in change_cells(c)))
    return table


@runs_app.command("compare")
@cli_errors
def runs_compare(run_ids: Annotated[list[str], typer.Argument(help="Two or more run ids.", metavar="RUN...")],
                 as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON.")] = False) -> None:
    """Put runs side by side: scores, the gain and its interval, promoted, LM calls, duration, trials.

    One column per run, in the order given. Exits 2 naming a run that does not exist.
    """
    from ..optimize.compare import compare_rows, run_scores

    if len(run_ids) < 2:
        fail("compare needs two or more run ids", code=EXIT_INVALID)
    with open_client() as client:
        rows = []
        for run_id in run_ids:
            try:
                rows.append(run_scores(client.runs.get(run_id).to_json()))
            except RunNotFound:
                fail(f"no optimization run '{run_id}'", code=EXIT_INVALID)
    if as_json:
        echo_json(rows)
        return
    table = Table(title=f"{len(rows)} runs side by side", title_justify="left", header_style="bold")
    table.add_column("", style="bold cyan", no_wrap=True)
    for row in rows:
        table.add_column(esc(row["run_id"]), justify="right", no_wrap=True)
    for label, cells in compare_rows(rows):
        table.add_row(label, *(esc(c) for c in cells))
    console.print(table)


@runs_app.command("cancel")
@cli_errors
def runs_cancel(run_id: RunId) -> None:
    """Ask a run to stop at its next stage boundary (the session's program stays untouched)."""
    with open_client() as client:
        run = client.run(run_id)
        if (status := run.status()["status"]) in ("succeeded", "failed", "cancelled"):
            fail(f"run {run_id} already {status}; nothing to cancel")
        run.cancel()
    console.print(f"cancel requested for run {run_id} ({status}); it stops at the next stage boundary")


@runs_app.command("plot")
@cli_errors
def runs_plot(run_ids: Annotated[list[str], typer.Argument(help="Run id; two or more are drawn side by side.",
                                                              metavar="RUN...")],
              out: Annotated[Path | None, typer.Option("--out", "-o", help="PNG file to write.",
                                                       show_default="run-<id>.png or compare-<ids>.png")] = None,
              ) -> None:
    """Write a PNG of the run: score per trial, baseline and candidate, and the score over time.

    Given several runs, a chart of them side by side: baseline and candidate, the gain and its interval.
    """
    from ..optimize.plots import plot_compare, plot_run

    with open_client() as client:
        records = [client.runs.get(run_id).to_json() for run_id in run_ids]
        events = list(client.runs.events(run_ids[0], follow=False)) if len(run_ids) == 1 else []
    if len(run_ids) == 1:
        path = plot_run(records[0], events, out or Path(f"run-{run_ids[0]}.png"))
    else:
        path = plot_compare(records, out or Path("compare-" + "-".join(r[:8] for r in run_ids) + ".png"))
    console.print(f"wrote {path}")


@schedule_app.command("add")
@cli_errors
def schedule_add(
    name: Annotated[str, typer.Argument(help="Schedule name; also the signature when --signature is not given.")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Stored dataset each run trains on.")],
    session: Annotated[str, typer.Option("--session", "-s", help="Session whose program is promoted.")],
    cron: Annotated[str | None, typer.Option("--cron", help="Five-field cron, e.g. '0 3 * * *' (UTC).")] = None,
    every: Annotated[float | None, typer.Option("--every", help="Run every N seconds instead of --cron.")] = None,
    signature: Annotated[str | None, typer.Option("--signature", help="Signature to optimize.",
                                                  show_default="NAME")] = None,
    metric: MetricOpt = "exact_match", optimizer: OptimizerOpt = "bootstrap_few_shot",
    program: Annotated[str | None, typer.Option("--program", "-p", help="Program name.",
                                                show_default="the signature")] = None,
    param: ParamOpt = None, params: ParamsOpt = None,
) -> None:
    """Create or replace a scheduled re-optimization; [bold]dspex beat[/] starts its runs when due.

    NAME names the schedule. Without --signature, NAME is also the signature, so
    `dspex schedule add qa --cron "0 3 * * *" --dataset qa-train --session s` re-optimizes qa nightly.
    """
    from ..optimize.params import check_params
    from ..optimize.schedules import add_schedule

    sig, run_params = signature or name, parse_params(param, params)
    with open_client() as client:
        published = client.signatures(refresh=True)
        if published and sig not in published:
            hint = "pass --signature SIG" if signature is None else f"published: {', '.join(sorted(published))}"
            raise UnknownSignature(f"'{sig}' is not a published signature ({hint})")
        caps = client.capabilities()
        for field, value in (("metric", metric), ("optimizer", optimizer)):
            known = caps.get(f"{field}s")
            if known is not None and value not in known:
                raise ValidationError.from_errors("schedule", [
                    {"field": field, "message": f"unknown {field} '{value}'; known: {', '.join(known)}"}])
        check_params(run_params, optimizer, (caps.get("optimizer_params") or {}).get(optimizer))
        if dataset not in client.datasets.list():
            err.print(f"[yellow]note:[/] no dataset '{esc(dataset)}' yet: runs fail until it is stored")
        entry = add_schedule(client.app, name, signature=sig, dataset=dataset, metric=metric, optimizer=optimizer,
                             session=session, program=program, params=run_params, cron=cron, every_s=every)
    console.print(f"schedule [bold]{esc(name)}[/]: {esc(optimizer)} on {esc(sig)} ({esc(entry['schedule'])}), "
                  f"dataset {esc(dataset)}, session {esc(session)}; next due {entry['due_at'] or '-'}")


@schedule_app.command("ls")
@cli_errors
def schedule_ls(as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """List scheduled re-optimizations."""
    from ..optimize.schedules import list_schedules

    with open_client() as client:
        entries = list_schedules(client.app)
    if as_json:
        echo_json(entries)
        return
    if not entries:
        err.print("no schedules")
        return
    table = Table(title=f"schedules ({len(entries)})", title_justify="left")
    for col in ("name", "schedule", "signature", "dataset", "session", "optimizer", "metric", "enabled", "last run",
                "due"):
        table.add_column(col, overflow="fold")
    for e in entries:
        kw = e["kwargs"]
        table.add_row(esc(e["name"]), esc(e["schedule"]), esc(kw["signature"]), esc(kw["dataset"]),
                      esc(kw["session"]), esc(kw["optimizer"]), esc(kw["metric"]), "yes" if e["enabled"] else "no",
                      *(esc((e[k] or "-")[:19].replace("T", " ")) for k in ("last_run_at", "due_at")))
    console.print(table)


@schedule_app.command("rm")
@cli_errors
def schedule_rm(name: Annotated[str, typer.Argument(help="Schedule name.")]) -> None:
    """Delete a schedule (runs it already started go on)."""
    from redbeat.schedulers import ensure_conf

    from ..optimize.schedules import remove_schedule

    with open_client() as client:
        ensure_conf(client.app)  # remove_schedule reads app.redbeat_conf, which only RedBeat's own calls set
        if not remove_schedule(client.app, name):
            fail(f"no schedule '{name}'")
    console.print(f"removed schedule {esc(name)}")


@cli_errors
def beat(loglevel: Annotated[str, typer.Option("--loglevel", "-l")] = "INFO") -> None:
    """Run celery beat with RedBeat: starts scheduled runs when due (one active beat however many run)."""
    from ..worker.app import create_worker_app

    create_worker_app().start(["beat", "--loglevel", loglevel])  # settings from DSPEX_* (load_settings())
