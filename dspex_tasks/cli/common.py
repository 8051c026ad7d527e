"""Shared pieces of the ``dspex`` command line: consoles, the client, error reporting, formatting.

Kept free of celery and dspy imports so ``dspex --help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from .. import wire
from ..connections import redacted_url, unreachable_message
from ..errors import DspexError, InvalidId, ValidationError
from ..wire import DEFAULT_REDIS_URL

if TYPE_CHECKING:  # pragma: no cover
    from ..client import Client

__all__ = ["console", "err", "cli_errors", "fail", "open_client", "preview", "redacted_url", "echo_json", "esc",
           "parse_json", "read_text", "read_jsonl"]

#: Results and tables (stdout).
console = Console(highlight=False)
#: Errors, notices and progress (stderr), so stdout stays parseable.
err = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])

#: Exit status for bad input (also click's usage-error status).
EXIT_INVALID = 2


def fail(message: str, *, code: int = 1, fields: list[dict[str, str]] | None = None) -> NoReturn:
    """Print a red error (and the offending fields) to stderr and exit with ``code``."""
    err.print(f"[bold red]error:[/] {esc(message)}", soft_wrap=True)  # one line, whatever the terminal width
    for item in fields or []:
        err.print(f"  [red]•[/] [bold]{esc(item.get('field') or '<root>')}[/]: {esc(item.get('message', ''))}")
    raise typer.Exit(code)


def esc(text: Any) -> str:
    """``text`` with rich markup escaped (data such as ``list[str]`` must not read as a style tag)."""
    return escape(str(text))


def cli_errors(func: F) -> F:
    """Turn library and connection errors into one red line and an exit status instead of a traceback.

    ``ValidationError`` and ``InvalidId`` (a bad session, program or other id) exit 2, anything else 1.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ValidationError, InvalidId) as exc:
            fail(f"{type(exc).__name__}: {exc.message}", code=EXIT_INVALID,
                 fields=exc.errors if isinstance(exc, ValidationError) else None)
        except DspexError as exc:
            fail(f"{type(exc).__name__}: {exc.message}")
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as exc:
            if _is_connection_error(exc):
                broker = os.environ.get("DSPEX_BROKER_URL", "")
                if broker.startswith(("amqp", "pyamqp")) and type(exc).__module__.startswith(("kombu", "amqp")):
                    fail(unreachable_message("cannot reach RabbitMQ", broker, exc, variable="DSPEX_BROKER_URL"))
                configured = os.environ.get("DSPEX_REDIS_URL")
                fail(unreachable_message("cannot reach Redis", configured or DEFAULT_REDIS_URL, exc,
                                         configured=configured is not None))
            raise

    return wrapper  # type: ignore[return-value]


def _is_connection_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    module = type(exc).__module__
    return bool(names & {"ConnectionError", "OperationalError", "TimeoutError"}) and (
        module.startswith(("redis", "kombu", "celery")) or isinstance(exc, ConnectionError))


@contextmanager
def open_client() -> Iterator[Client]:
    """A :class:`~dspex_tasks.client.Client` from ``DSPEX_*`` settings, closed afterwards."""
    from ..client import Client
    from ..settings import load_settings

    client = Client(settings=load_settings())
    try:
        yield client
    finally:
        client.close()


def preview(value: Any, limit: int = 60) -> str:
    """A one-line, shortened rendering of an output value."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def echo_json(data: Any) -> None:
    """Plain, indented JSON on stdout (no rich wrapping, so it always parses)."""
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str, where: str) -> Any:
    """Strict JSON: NaN, Infinity and nesting past ``wire.MAX_JSON_DEPTH`` levels exit 2 naming ``where``."""
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        fail(f"{where}: not JSON: nested deeper than {wire.MAX_JSON_DEPTH} levels", code=EXIT_INVALID)
    except ValueError as exc:  # JSONDecodeError, NaN and Infinity
        fail(f"{where}: not JSON: {exc}", code=EXIT_INVALID)
    try:
        wire.check_json(data, "", finite=True)
    except ValidationError as exc:
        fail(f"{where}: {exc.message}", code=EXIT_INVALID)
    return data


def read_text(path: Path, *, limit: int | None = None) -> str:
    """A UTF-8 text file ('-' for stdin); unreadable, binary or (past ``limit`` bytes) too large exits 2."""
    try:
        if str(path) == "-":
            raw = sys.stdin.buffer.read(-1 if limit is None else limit + 1)
        else:
            with path.open("rb") as f:
                raw = f.read(-1 if limit is None else limit + 1)
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}", code=EXIT_INVALID)
    if limit is not None and len(raw) > limit:
        fail(f"{path} is larger than {limit} bytes (DSPEX_MAX_STATE_BYTES)", code=EXIT_INVALID)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        fail(f"{path} is not UTF-8 text (byte {exc.start})", code=EXIT_INVALID)


def read_jsonl(path: Path, what: str = "") -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, or of a file holding one JSON array ('-' for stdin).

    An array is what ``json.dump([ex.toDict() for ex in trainset], f)`` writes from DSPy; a bad line or
    element exits 2 naming ``file:line`` (``file[index]`` in an array). ``what`` completes the message for
    an entry that is not an object (``" of inputs"``).
    """
    text = read_text(path)
    if text.lstrip().startswith("["):
        items = parse_json(text, str(path))
        if not isinstance(items, list):  # pragma: no cover - a leading "[" parses as a list or fails
            fail(f"{path}: expected a JSON array of objects", code=EXIT_INVALID)
        for i, row in enumerate(items):
            if not isinstance(row, dict):
                fail(f"{path}[{i}]: expected a JSON object{what}, got {type(row).__name__}", code=EXIT_INVALID)
        return items
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = parse_json(line, f"{path}:{n}")
        if not isinstance(row, dict):
            fail(f"{path}:{n}: expected a JSON object{what}, got {type(row).__name__}", code=EXIT_INVALID)
        rows.append(row)
    return rows


def json_object(text: str | None, option: str) -> dict[str, Any]:
    """The JSON object an option such as ``--json`` carries ({} when not given); anything else exits 2."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"{option} is not valid JSON: {exc}", code=EXIT_INVALID)
    if not isinstance(data, dict):
        fail(f"{option} must be a JSON object", code=EXIT_INVALID)
    return data
