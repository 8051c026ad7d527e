"""The one way a worker runs a DSPy module, for predictions and optimization stages alike.

Every run happens under ``dspy.context(lm=..., track_usage=True, disable_history=True)`` (never
``dspy.configure``: concurrent tasks never see each other's LM) inside a usage scope, so each LM call is
billed to the program and session it served, whoever made it: a prediction, an evaluation example, or an
optimizer compiling a candidate in threads of its own. Failures inside the module come out as typed
errors (:mod:`dspex_tasks.lm.errors`); the usage goes to the process's :class:`~dspex_tasks.lm.usage.UsageLedger`
and so to ``dspex usage``.

Per-request options (``wire.Options``) apply here: ``lm_config`` runs the job on ``lm.copy(**lm_config)``
(a shallow copy: the governed LM's cache, rate limits, retries and usage recording come along, and its
changed settings travel with every call of every predictor); ``trace`` returns DSPy's trace of the run as
JSON (:mod:`.trace`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import Cancelled, DspexError, LMParseError
from ..lm.errors import to_lm_error
from ..lm.factory import lm_name
from ..lm.gate import GATE_KEY
from ..lm.usage import DSPY_KEY, TaskUsage, UsageLedger, task_usage
from ..observability.redact import redact_error
from .live import JobControl, JobStopped, make_callback, stream_run, text_outputs
from .trace import trace_entries

if TYPE_CHECKING:  # pragma: no cover
    from ..dsl.signature import Signature
    from ..wire import TraceEntry

__all__ = ["DSPY_TASK_SETTINGS", "ModuleRunner", "Run", "classify_lm_error"]

# Per-task DSPy settings. DSPy otherwise keeps every call's prompt and answer in a process-wide
# history (10,000 entries): tens of MB in a long-lived worker, and nothing here reads it. Set per
# task (not with dspy.configure) so an in-process worker never changes its host's DSPy.
DSPY_TASK_SETTINGS: dict[str, Any] = {"disable_history": True}


def classify_lm_error(sig: Signature, exc: BaseException) -> DspexError:
    """Map a failure inside the DSPy call to the matching typed error, configured secrets masked in its text
    (it is stored as the task's result, shown by Flower and logged)."""
    if isinstance(exc, DspexError):
        return redact_error(exc)
    name = type(exc).__name__
    if name == "AdapterParseError":
        return redact_error(LMParseError(f"LM output for signature '{sig.name}' did not parse: {_short(exc)}"))
    return to_lm_error(exc, f"LM call for signature '{sig.name}' failed ({name}): {_short(exc)}")


def _short(exc: BaseException, limit: int = 500) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class Run:
    """One module call: DSPy's prediction, its usage (as a result reports it), the model that answered, and
    its predictor calls when traced."""

    prediction: Any
    usage: dict[str, Any]
    lm: str
    trace: list[TraceEntry] | None = None


#: ``context(trace=...)`` default: DSPy's own trace setting is left alone.
DSPY_DEFAULT: Any = object()


def keeps_trace(module: Any) -> bool:
    """Whether ``module`` reads DSPy's trace itself (``Refine``, ``BestOfN``), so a run must record one even when
    the job did not ask for it; any other run records none (``trace=None``: no per-call list work or memory)."""
    cached = getattr(module, "_dspex_keeps_trace", None)
    if cached is not None:
        return bool(cached)
    import dspy

    readers = tuple(cls for cls in (getattr(dspy, "Refine", None), getattr(dspy, "BestOfN", None)) if cls)
    found = isinstance(module, readers) or any(isinstance(sub, readers) for _, sub in module.named_sub_modules())
    with contextlib.suppress(AttributeError):
        module._dspex_keeps_trace = found
    return found


class ModuleRunner:
    """Runs modules for one worker process.

    Args:
        ledger: Where usage is aggregated (flushed to Redis in the background).
        lm_for: The LM for a signature; ``recorded=True`` asks for one that reports every call to the usage
            scope itself (what an optimizer's own threads need; see :meth:`spend`).
    """

    def __init__(self, ledger: UsageLedger, lm_for: Callable[..., Any]) -> None:
        self.ledger = ledger
        self.lm_for = lm_for

    @contextlib.contextmanager
    def context(self, sig: Signature, session: str | None, *, callbacks: Sequence[Any] = (),
                recorded: bool = False, lm_config: dict[str, Any] | None = None,
                trace: Any = DSPY_DEFAULT, gate: Callable[[], None] | None = None) -> Iterator[TaskUsage]:
        """DSPy's context for running ``sig``'s modules, and the usage scope that counts their LM calls.

        Args:
            lm_config: Checked per-request LM settings (``wire.check_options``) for every LM call inside.
            trace: The list DSPy records this block's predictor calls in (None: none is recorded; default:
                DSPy's own).
        """
        import dspy

        # A program makes several LM calls per task: each is recorded (DSPy's own usage merges a model's calls).
        lm = self.lm_for(sig, recorded=recorded or sig.kind == "program")
        if lm_config:
            lm = lm.copy(**lm_config)
        extra: dict[str, Any] = {"callbacks": list(callbacks)} if callbacks else {}
        if trace is not DSPY_DEFAULT:
            extra["trace"] = trace
        if gate is not None:
            extra[GATE_KEY] = gate
        with task_usage(sig.name, session) as spent:
            spent.default_lm = lm_name(lm)
            with dspy.context(lm=lm, track_usage=True, **{DSPY_KEY: spent}, **extra, **DSPY_TASK_SETTINGS):
                yield spent

    def run(self, sig: Signature, module: Any, inputs: dict[str, Any], session: str | None, *,
            callbacks: Sequence[Any] = (), count_task: bool = True, lm_config: dict[str, Any] | None = None,
            trace: bool = False, control: JobControl | None = None) -> Run:
        """Call ``module(**inputs)``; a failure raises as its typed error (and records no usage, as before).

        A run records DSPy's trace only when ``trace`` asks for it or the module reads it (``Refine``,
        ``BestOfN``), in a list of its own dropped with the run: DSPy's default is one process-wide list
        (10,000 entries, ~15 MB, and ``Refine``/``BestOfN`` extend it past that cap) that would keep other
        jobs' inputs and outputs alive in the worker.

        With ``control`` (:mod:`.live`), the job stops before its next LM call or tool when it is cancelled or
        out of time (``errors.Cancelled``); a streamed job runs under ``dspy.streamify`` and writes its events.
        """
        calls: list[Any] | None = [] if trace or keeps_trace(module) else None
        callbacks, streamed = self._live(sig, module, callbacks, control)
        with self.context(sig, session, callbacks=callbacks, lm_config=lm_config, trace=calls,
                          gate=control.check if control is not None else None) as spent:
            try:
                prediction = stream_run(module, inputs, control, streamed) if control is not None and streamed \
                    else module(**inputs)
            except JobStopped as stop:
                raise Cancelled(stop.reason) from None
            except Exception as exc:
                raise classify_lm_error(sig, exc) from None
        usage = self.ledger.finish(spent, prediction, sig.name, session, count_task=count_task)
        return Run(prediction, usage, spent.served or spent.default_lm, trace_entries(module, calls or []) if trace else None)

    async def arun(self, sig: Signature, module: Any, inputs: dict[str, Any], session: str | None, *,
                   lm_config: dict[str, Any] | None = None, trace: bool = False,
                   gate: Callable[[], None] | None = None) -> Run:
        """:meth:`run` as a coroutine (``module.acall``), for modules that define ``aforward``; run it on the
        process's event loop (``dspex.map`` items). ``gate`` is called before each of its LM calls."""
        calls: list[Any] | None = [] if trace or keeps_trace(module) else None
        with self.context(sig, session, lm_config=lm_config, trace=calls, gate=gate) as spent:
            try:
                prediction = await module.acall(**inputs)
            except Exception as exc:
                raise classify_lm_error(sig, exc) from None
        usage = self.ledger.finish(spent, prediction, sig.name, session, count_task=True)
        return Run(prediction, usage, spent.served or spent.default_lm, trace_entries(module, calls or []) if trace else None)

    @staticmethod
    def _live(sig: Signature, module: Any, callbacks: Sequence[Any], control: JobControl | None
              ) -> tuple[Sequence[Any], list[str]]:
        if control is None or not control.streaming:
            return callbacks, []
        return [*callbacks, make_callback(control, module)], text_outputs(sig.output_fields)

    def spend(self, spent: TaskUsage, sig: Signature, session: str | None) -> dict[str, Any]:
        """Record what a :meth:`context` block spent outside :meth:`run` (an optimizer's compile step)."""
        return self.ledger.finish(spent, None, sig.name, session, count_task=False)
