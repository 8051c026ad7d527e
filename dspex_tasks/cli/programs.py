"""``dspex programs ...`` and ``dspex sessions ...``: the session program store from the shell."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .. import keys
from ..errors import ProgramNotFound, SessionNotFound, UnknownSignature
from .common import cli_errors, console, echo_json, err, open_client, parse_json, read_text

__all__ = ["programs_app", "sessions_app"]

programs_app = typer.Typer(help="Stored programs of a session: list, show, history, rollback, put, rm.",
                           no_args_is_help=True)
sessions_app = typer.Typer(help="Sessions that hold programs: list and remove.", no_args_is_help=True)

Session = Annotated[str, typer.Argument(help="Session id (1-128 chars of [A-Za-z0-9._:-]).")]
Program = Annotated[str, typer.Argument(help="Program name (often the signature's name).")]


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _demos(state: dict[str, Any]) -> int:
    """Demos in a state: the short form ``{demos}`` or DSPy's per-predictor ``dump_state()``."""
    if isinstance(state.get("demos"), list):
        return len(state["demos"])
    return sum(len(v.get("demos") or []) for v in state.values() if isinstance(v, dict))


def _require(store: Any, session: str, program: str) -> list[int]:
    history: list[int] = store.history(session, program)
    if not history:
        raise ProgramNotFound(f"no program '{program}' in session '{session}'")
    return history


@programs_app.command("ls")
@cli_errors
def programs_ls(session: Session) -> None:
    """List a session's programs with their current version."""
    with open_client() as client:
        store = client.programs
        names = store.list(session)
        if not names:
            err.print(f"no programs in session '{session}'")
            return
        table = Table(title=f"programs in session {session}", title_justify="left")
        for col in ("program", "version", "versions", "signature", "demos", "updated"):
            table.add_column(col, justify="right" if col in ("version", "versions", "demos") else "left")
        for name in names:
            try:
                rec = store.get(session, name)
            except ProgramNotFound:  # deleted meanwhile
                continue
            table.add_row(name, str(rec.version), str(len(store.history(session, name))), rec.signature or name,
                          str(_demos(rec.state)), _when(rec.updated_at))
        console.print(table)


@programs_app.command("show")
@cli_errors
def programs_show(session: Session, program: Program,
                  version: Annotated[int | None, typer.Option("--version", "-v", help="A past version.")] = None
                  ) -> None:
    """Print a program's state as JSON (stdout), with a one-line header on stderr."""
    with open_client() as client:
        rec = client.programs.get(session, program, version)
    err.print(f"[bold]{session}/{program}[/] v{rec.version}  signature={rec.signature or program}  "
              f"demos={_demos(rec.state)}  updated {_when(rec.updated_at)}")
    if sys.stdout.isatty():
        console.print_json(data=rec.state)
    else:
        echo_json(rec.state)


@programs_app.command("history")
@cli_errors
def programs_history(session: Session, program: Program) -> None:
    """List every stored version; the current one is marked."""
    with open_client() as client:
        store = client.programs
        history = _require(store, session, program)
        current = store.current_version(session, program)
        table = Table(title=f"{session}/{program}", title_justify="left")
        for col in ("version", "current", "signature", "demos", "bytes", "stored"):
            table.add_column(col, justify="right" if col in ("version", "demos", "bytes") else "left")
        for v in history:
            rec = store.get(session, program, v)
            size = len(json.dumps(rec.state, separators=(",", ":")))
            table.add_row(str(v), "[green]●[/]" if v == current else "", rec.signature or program,
                          str(_demos(rec.state)), str(size), _when(rec.updated_at))
        console.print(table)


@programs_app.command("rollback")
@cli_errors
def programs_rollback(session: Session, program: Program,
                      version: Annotated[int, typer.Argument(help="The version to make current.")]) -> None:
    """Make an earlier version current again (history is kept; workers pick it up at once)."""
    with open_client() as client:
        store = client.programs
        before = store.current_version(session, program)
        v = store.rollback(session, program, version)
    console.print(f"{session}/{program}: v{before} → [bold]v{v}[/] is current")


@programs_app.command("rm")
@cli_errors
def programs_rm(session: Session, program: Program) -> None:
    """Delete a program and all its versions."""
    with open_client() as client:
        store = client.programs
        history = _require(store, session, program)
        store.delete(session, program)
    console.print(f"removed {session}/{program} ({len(history)} versions)")


@programs_app.command("put")
@cli_errors
def programs_put(session: Session, program: Program,
                 file: Annotated[Path, typer.Argument(help="JSON state file ('-' for stdin): DSPy dump_state() "
                                                          "output or {\"demos\": [...], \"instructions\": ...}.",
                                                     allow_dash=True)],
                 signature: Annotated[str | None, typer.Option(help="The signature it serves "
                                                                    "(default: the program name).")] = None) -> None:
    """Store a new version of a program and make it current."""
    # at most DSPEX_MAX_STATE_BYTES + 1 bytes: /dev/zero or a huge file is refused, not read to the end
    from ..settings import load_settings

    state = parse_json(read_text(file, limit=load_settings().max_state_bytes), str(file))
    with open_client() as client:
        published = client.signatures()
        sig = signature or program
        if published and sig not in published:
            hint = "pass --signature NAME" if signature is None else f"published: {', '.join(sorted(published))}"
            raise UnknownSignature(f"'{sig}' is not a published signature ({hint})")
        v = client.programs.put(session, program, state, signature=signature)
    console.print(f"stored {session}/{program} [bold]v{v}[/] (signature {sig}, {_demos(state)} demos)")


@sessions_app.command("ls")
@cli_errors
def sessions_ls() -> None:
    """List sessions, most recently written or used first."""
    with open_client() as client:
        rows = client.redis.zrevrange(keys.sessions(client.settings.namespace), 0, -1, withscores=True)
        if not rows:
            err.print(f"no sessions in namespace '{client.settings.namespace}'")
            return
        table = Table(title=f"sessions ({len(rows)})", title_justify="left")
        table.add_column("session")
        table.add_column("programs", justify="right")
        table.add_column("last used")
        for raw, score in rows:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            table.add_row(name, str(len(client.programs.list(name))), _when(float(score)))
        console.print(table)


@sessions_app.command("rm")
@cli_errors
def sessions_rm(session: Session) -> None:
    """Delete a session and every program in it."""
    with open_client() as client:
        store = client.programs
        programs = store.list(session)
        if not programs and session not in store.sessions():
            raise SessionNotFound(f"no session '{session}'")
        store.delete_session(session)
    console.print(f"removed session {session} ({len(programs)} programs)")
