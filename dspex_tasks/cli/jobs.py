"""A job's live side on the command line: ``dspex submit --follow`` (its events rendered as they arrive) and
``dspex cancel JOB_ID``.

Live events go to stderr, like progress bars: tokens appended per field, steps, tool calls and status changes
as dim lines. The result goes to stdout exactly as ``dspex submit`` prints it without ``--follow``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from ..errors import DspexError, from_remote
from .common import cli_errors, console, echo_json, err, esc, open_client, preview

if TYPE_CHECKING:  # pragma: no cover
    from ..client import Job, Result

__all__ = ["EventPrinter", "follow", "register", "cancel"]


class EventPrinter:
    """Renders live events (:mod:`dspex_tasks.live`) as lines: a field's tokens on one line after its name, a
    ``reset`` starting the field over on a new line, everything else dim on a line of its own."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self.field: str | None = None  # the field whose tokens the current line holds

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "token":
            self._token(str(event.get("field", "?")), str(event.get("chunk", "")), bool(event.get("reset")))
        elif kind == "step":
            what = f"{event.get('phase')} {event.get('kind', 'step')} {event.get('name', '?')}"
            self._line(what + (f" · {event['error']}" if event.get("error") else ""))
        elif kind == "tool":
            if event.get("phase") == "start":
                self._line(f"tool {event.get('name', '?')}({preview(event.get('arguments') or {}, 80)})")
            elif "error" in event:
                self._line(f"tool {event.get('name', '?')} failed: {preview(event['error'], 80)}")
            else:
                self._line(f"tool {event.get('name', '?')} -> {preview(event.get('result'), 80)}")
        elif kind == "status":
            attempt = f" (attempt {event['attempt'] + 1})" if event.get("attempt") else ""
            reason = f": {preview(event['reason'], 80)}" if event.get("reason") else ""
            self._line(f"{event.get('state', '?')}{attempt}{reason}")
        elif kind in ("result", "error"):
            self.end_line()

    def _token(self, field: str, chunk: str, reset: bool) -> None:
        if reset or field != self.field:
            self.end_line()
            again = " [dim](again)[/]" if reset else ""
            self.out.print(f"[bold cyan]{esc(field)}[/]{again}: ", end="")
            self.field = field
        self.out.print(esc(chunk), end="", soft_wrap=True)

    def _line(self, text: str) -> None:
        self.end_line()
        self.out.print(f"[dim]{esc(text)}[/]", soft_wrap=True)

    def end_line(self) -> None:
        """Finish the line of tokens, if one is open."""
        if self.field is not None:
            self.out.print()
            self.field = None


def follow(job: Job, *, timeout: float | None) -> Result:
    """Render a streamed job's events on stderr until its last one; its :class:`~dspex_tasks.client.Result`.

    Raises:
        errors.*: the job's failure, as ``job.get()`` raises it (``Cancelled``, ``ValidationError``, ...).
        TaskTimeout: the job did not end within ``timeout`` seconds.
    """
    from ..client import Result

    printer = EventPrinter(err)
    try:
        for event in job.events(timeout=timeout):
            printer(event)
            if event["type"] == "result":
                return Result.from_json(event["result"])
            if event["type"] == "error":
                job.get(timeout=5.0)  # raises the failure as its own class, with every detail it stored
                error = event.get("error") or {}
                raise from_remote(str(error.get("type", "DspexError")), [str(error.get("message", ""))])
    except KeyboardInterrupt:
        printer.end_line()
        err.print(f"[yellow]stopped following; job {job.id} keeps running (dspex cancel {job.id} stops it)[/]")
        raise
    raise DspexError(f"job {job.id}: its events ended without a result")  # read_events never ends so


@cli_errors
def cancel(
    job_id: Annotated[str, typer.Argument(help="The job id (dspex submit prints it).")],
    reason: Annotated[str, typer.Option("--reason", help="Why; the job's Cancelled error says it.")] =
        "cancelled from the command line",
    as_json: Annotated[bool, typer.Option("--json", help="Print {\"id\", \"cancelled\"} as JSON.")] = False,
) -> None:
    """Stop a job: a queued one when a worker takes it, a running one before its next LM or tool call.

    It ends as Cancelled. Prints whether the cancel was requested or the job had already finished (both exit 0);
    an id nobody knows reads as a queued job.
    """
    with open_client() as client:
        cancelled = client.job(job_id).cancel(reason)
    if as_json:
        echo_json({"id": job_id, "cancelled": cancelled})
    elif cancelled:
        console.print(f"cancelled job [bold]{esc(job_id)}[/]: it ends as Cancelled (a running job after its "
                      "current LM call)", soft_wrap=True)
    else:
        console.print(f"job [bold]{esc(job_id)}[/] had already finished: nothing to cancel", soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``cancel`` to the root app (``submit --follow`` lives in :mod:`.core`, with ``submit``)."""
    app.command()(cancel)
