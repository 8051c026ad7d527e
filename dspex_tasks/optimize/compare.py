"""What a run changed, and runs side by side: dspy-free, for ``dspex runs show`` and ``dspex runs compare``.

Program states are DSPy ``dump_state()`` JSON (``{predictor: {"demos": [...], "signature":
{"instructions": ...}}}``, a ``Predict``'s own state at the top level) or the short form
``{"demos": [...], "instructions": ...}``; a run with no baseline state started from the
program's defaults (no demos, the signature's instructions).

Example:
    >>> before = None
    >>> after = {"predict": {"demos": [{"q": "a"}], "signature": {"instructions": "Answer."}}}
    >>> [c.to_json()["demos"] for c in predictor_changes(before, after)]
    [[0, 1]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..programs.store import PREDICTOR_KEYS, PROGRAM_KEYS, SHORT_FORM_KEYS

__all__ = ["PredictorChange", "predictor_changes", "run_scores", "shorten", "change_cells", "compare_rows",
           "state_parts", "part_instructions", "COMPARE_FIELDS"]

#: The name DSPy's ``named_predictors()`` gives a ``Predict`` whose state is the top level.
_SELF = "self"


@dataclass(frozen=True)
class PredictorChange:
    """One predictor's demos and instructions before and after a run (None: the default, not known here)."""

    predictor: str
    demos_before: int
    demos_after: int
    instructions_before: str | None
    instructions_after: str | None

    @property
    def instructions_changed(self) -> bool | None:
        """True/False, or None when one side is the default and the default is not known."""
        if self.instructions_before is None or self.instructions_after is None:
            return None if self.instructions_before != self.instructions_after else False
        return " ".join(self.instructions_before.split()) != " ".join(self.instructions_after.split())

    def to_json(self) -> dict[str, Any]:
        return {"predictor": self.predictor, "demos": [self.demos_before, self.demos_after],
                "instructions": [self.instructions_before, self.instructions_after],
                "instructions_changed": self.instructions_changed}


def state_parts(state: Any) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """(each named predictor's part, the top-level part or None) of a program state (also the console's diff)."""
    if not isinstance(state, dict):
        return {}, None
    named = {k: v for k, v in state.items()
             if isinstance(v, dict) and k not in PREDICTOR_KEYS and k not in PROGRAM_KEYS}
    top = state if any(k in state for k in SHORT_FORM_KEYS) else None
    return named, top


def part_instructions(part: dict[str, Any] | None) -> str | None:
    """A predictor part's instructions (short form, or its signature's), None when it has none."""
    if part is None:
        return None
    if isinstance(part.get("instructions"), str):
        return str(part["instructions"])
    for key in ("signature", "extended_signature"):
        sig = part.get(key)
        if isinstance(sig, dict) and isinstance(sig.get("instructions"), str):
            return str(sig["instructions"])
    return None


def _demos(part: dict[str, Any] | None) -> int:
    demos = (part or {}).get("demos")
    return len(demos) if isinstance(demos, list) else 0


def predictor_changes(baseline: dict[str, Any] | None, candidate: dict[str, Any] | None, *,
                      default_instructions: str | None = None) -> list[PredictorChange]:
    """Per predictor: demo counts and instructions in ``baseline`` -> ``candidate``, candidate's order first.

    Args:
        baseline: the program state the run started from (None: the program's defaults).
        candidate: the state the run compiled.
        default_instructions: the signature's own instructions, when known: what a predictor without
            instructions in a state has (applied to single-predictor programs only).
    """
    b_named, b_top = state_parts(baseline)
    c_named, c_top = state_parts(candidate)
    names = list(dict.fromkeys([*c_named, *b_named]))
    single = len(names) <= 1
    if single:  # one predictor: its state may sit at the top, under its own name, "self" or "predict"
        name = names[0] if names else _SELF
        pairs = {name: (next(iter(b_named.values()), b_top), next(iter(c_named.values()), c_top))}
    else:  # several: each its own entry, else the short form's (which applies to every predictor without one)
        pairs = {n: (b_named.get(n, b_top), c_named.get(n, c_top)) for n in names}
    default = default_instructions if single else None
    out = []
    for name, (before, after) in pairs.items():
        out.append(PredictorChange(name, _demos(before), _demos(after), part_instructions(before) or default,
                                   part_instructions(after) or default))
    return out


def shorten(text: str | None, limit: int = 60) -> str:
    """One line of at most ``limit`` characters (``…`` marks a cut); ``(default)`` for None."""
    if text is None:
        return "(default)"
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def _number(value: Any) -> float | None:
    return None if isinstance(value, bool) or not isinstance(value, int | float) else float(value)


def run_scores(record: dict[str, Any]) -> dict[str, Any]:
    """A run's comparable numbers from its record JSON (``RunRecord.to_json``); None where not known (yet).

    Keys: run_id, status, signature, optimizer, metric, baseline, candidate, gain, gain_ci, confidence,
    confidence_required, n_val, promoted, lm_calls, duration_s, trials.
    """
    s = record.get("summary") or {}
    baseline = _number(s.get("baseline_score", record.get("baseline_score")))
    candidate = _number(s.get("score", record.get("candidate_score")))
    gain = _number(s.get("gain"))
    if gain is None and baseline is not None and candidate is not None:
        gain = candidate - baseline
    duration = _number(s.get("duration_s"))
    if duration is None and record.get("started_at") and record.get("finished_at"):
        duration = float(record["finished_at"]) - float(record["started_at"])
    ci = s.get("gain_ci")
    trials = s.get("trials", record.get("trials"))
    return {
        "run_id": record.get("run_id"), "status": record.get("status"), "signature": record.get("signature"),
        "optimizer": record.get("optimizer"), "metric": record.get("metric"), "baseline": baseline,
        "candidate": candidate, "gain": gain,
        "gain_ci": [float(ci[0]), float(ci[1])] if isinstance(ci, list) and len(ci) == 2 else None,
        "confidence": _number(s.get("confidence")), "confidence_required": s.get("confidence_required"),
        "n_val": s.get("n_val"), "promoted": s.get("promoted"),
        "lm_calls": s.get("lm_calls", record.get("lm_calls")), "duration_s": duration,
        "trials": len(trials) if isinstance(trials, list) else None,
    }


def change_cells(change: dict[str, Any], limit: int = 60) -> tuple[str, str]:
    """A change (``PredictorChange.to_json``) as text: ``"0 → 4"`` and ``"before → after"`` (or ``unchanged: ...``)."""
    (d0, d1), (i0, i1) = change["demos"], change["instructions"]
    if change.get("instructions_changed") is False:
        return f"{d0} → {d1}", f"unchanged: {shorten(i1, limit)}"
    return f"{d0} → {d1}", f"{shorten(i0, limit)} → {shorten(i1, limit)}"


def _dash(value: Any, fmt: str = "") -> str:
    return "-" if value is None else format(value, fmt)


def _interval(row: dict[str, Any]) -> str:
    if row["gain_ci"] is None:
        return "-"
    (lo, hi), level = row["gain_ci"], (row["confidence"] or 0.95) * 100
    return f"[{lo:+.3f}, {hi:+.3f}] at {level:g}%" + (", required" if row["confidence_required"] else "")


#: The rows of ``dspex runs compare``: a label and how a run's ``run_scores`` shows in it.
COMPARE_FIELDS: tuple[tuple[str, Any], ...] = (
    ("signature", lambda r: _dash(r["signature"])), ("optimizer", lambda r: _dash(r["optimizer"])),
    ("metric", lambda r: _dash(r["metric"])), ("status", lambda r: _dash(r["status"])),
    ("baseline", lambda r: _dash(r["baseline"], ".3f")), ("candidate", lambda r: _dash(r["candidate"], ".3f")),
    ("gain", lambda r: _dash(r["gain"], "+.3f")), ("gain interval", _interval),
    ("validation examples", lambda r: _dash(r["n_val"])),
    ("promoted", lambda r: "-" if r["promoted"] is None else "yes" if r["promoted"] else "no"),
    ("LM calls", lambda r: _dash(r["lm_calls"])),
    ("duration", lambda r: "-" if r["duration_s"] is None else f"{r['duration_s']:.1f} s"),
    ("trials", lambda r: _dash(r["trials"])),
)


def compare_rows(rows: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """``run_scores`` of several runs as table rows: (label, one cell per run)."""
    return [(label, [str(cell(r)) for r in rows]) for label, cell in COMPARE_FIELDS]
