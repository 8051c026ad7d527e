"""Two program versions side by side: per predictor, the instructions (word spans marked equal, removed or
added) and the demos (aligned rows: the same demo on both sides, one only on the left, one only on the right).

States are DSPy ``dump_state()`` JSON (``{predictor: {"demos": [...], "signature": {"instructions": ...}}}``) or
the short form ``{"demos": [...], "instructions": ...}``, which applies to every predictor without its own entry.

Example:
    >>> a = {"demos": [{"q": "1"}], "instructions": "Answer briefly."}
    >>> b = {"demos": [{"q": "1"}, {"q": "2"}], "instructions": "Answer very briefly."}
    >>> d = diff_states(a, b)[0]
    >>> [row.tag for row in d.demos], d.instructions_changed
    (['equal', 'added'], True)
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Any

from ...optimize.compare import part_instructions, state_parts
from ...programs.store import SINGLE_PREDICTOR_KEYS

__all__ = ["DemoRow", "PredictorDiff", "Span", "diff_states"]


@dataclass(frozen=True)
class Span:
    """A run of words: ``equal``, ``removed`` (left only) or ``added`` (right only)."""

    tag: str
    text: str


@dataclass(frozen=True)
class DemoRow:
    """One row of the demos table: ``equal``, ``removed`` (left only), ``added`` (right only)."""

    tag: str
    left: str | None
    right: str | None


@dataclass(frozen=True)
class PredictorDiff:
    predictor: str
    instructions: tuple[str | None, str | None]
    left_spans: list[Span]
    right_spans: list[Span]
    demos: list[DemoRow]

    @property
    def instructions_changed(self) -> bool:
        return _norm(self.instructions[0]) != _norm(self.instructions[1])

    @property
    def demos_changed(self) -> bool:
        return any(row.tag != "equal" for row in self.demos)


def _norm(text: str | None) -> str | None:
    return None if text is None else " ".join(text.split())


def _demos(part: dict[str, Any] | None) -> list[str]:
    demos = (part or {}).get("demos")
    if not isinstance(demos, list):
        return []
    return [json.dumps(d, ensure_ascii=False, sort_keys=True, default=str) for d in demos]


def _word_spans(left: str | None, right: str | None) -> tuple[list[Span], list[Span]]:
    a, b = (left or "").split(), (right or "").split()
    ls: list[Span] = []
    rs: list[Span] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            ls.append(Span("equal", " ".join(a[i1:i2])))
            rs.append(Span("equal", " ".join(b[j1:j2])))
            continue
        if i2 > i1:
            ls.append(Span("removed", " ".join(a[i1:i2])))
        if j2 > j1:
            rs.append(Span("added", " ".join(b[j1:j2])))
    return ls, rs


def _demo_rows(left: list[str], right: list[str]) -> list[DemoRow]:
    rows: list[DemoRow] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=left, b=right, autojunk=False).get_opcodes():
        if op == "equal":
            rows += [DemoRow("equal", x, x) for x in left[i1:i2]]
            continue
        rows += [DemoRow("removed", x, None) for x in left[i1:i2]]
        rows += [DemoRow("added", None, y) for y in right[j1:j2]]
    return rows


def diff_states(left: dict[str, Any] | None, right: dict[str, Any] | None) -> list[PredictorDiff]:
    """Per predictor (the right side's order first), its instructions and demos in ``left`` and ``right``."""
    l_named, l_top = state_parts(left)
    r_named, r_top = state_parts(right)
    names = list(dict.fromkeys([*r_named, *l_named]))
    if len(names) <= 1:  # one predictor: its part may be at the top, under its own name, "self" or "predict"
        name = names[0] if names else SINGLE_PREDICTOR_KEYS[0]
        pairs = {name: (next(iter(l_named.values()), l_top), next(iter(r_named.values()), r_top))}
    else:
        pairs = {n: (l_named.get(n, l_top), r_named.get(n, r_top)) for n in names}
    out = []
    for name, (before, after) in pairs.items():
        i0, i1 = part_instructions(before), part_instructions(after)
        ls, rs = _word_spans(i0, i1)
        out.append(PredictorDiff(name, (i0, i1), ls, rs, _demo_rows(_demos(before), _demos(after))))
    return out
