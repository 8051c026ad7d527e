"""Charts of optimization runs: the score per trial and the score over time, and runs side by side, as PNGs.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no global
state), so it is safe in threads and on headless hosts. Imported only by the
``dspex runs plot`` command, never by the client or the workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .compare import run_scores

__all__ = ["plot_run", "plot_compare"]

_BASELINE_COLOR = "tab:gray"
_CANDIDATE_COLOR = "tab:green"
_END = frozenset({"done", "failed", "cancelled"})
_STAGE_COLORS = {"queued": "tab:gray", "load": "tab:purple", "baseline": "tab:gray", "compile": "tab:orange",
                 "candidate": "tab:green", "done": "tab:blue", "failed": "tab:red", "cancelled": "tab:red"}


def _score(value: Any) -> float | None:
    """``value`` as a float score, or None when it is missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _reference_scores(record: dict[str, Any]) -> tuple[float | None, float | None]:
    """(baseline, candidate) scores from the summary, else from the record's running fields."""
    summary = record.get("summary") or {}
    baseline = _score(summary.get("baseline_score", record.get("baseline_score")))
    candidate = _score(summary.get("score", record.get("candidate_score")))
    return baseline, candidate


def _reference_lines(ax: Axes, baseline: float | None, candidate: float | None) -> None:
    if baseline is not None:
        ax.axhline(baseline, color=_BASELINE_COLOR, linestyle="--", linewidth=1.2, label=f"baseline {baseline:.3f}")
    if candidate is not None:
        ax.axhline(candidate, color=_CANDIDATE_COLOR, linestyle="-.", linewidth=1.2,
                   label=f"candidate {candidate:.3f}")


def _plot_trials(ax: Axes, trials: list[float], baseline: float | None, candidate: float | None) -> None:
    xs = list(range(1, len(trials) + 1))
    ax.plot(xs, trials, marker="o", color="tab:blue", linewidth=1.5, label="trial score")
    best = max(range(len(trials)), key=lambda i: trials[i])
    ax.annotate(f"best {trials[best]:.3f}", (xs[best], trials[best]), textcoords="offset points", xytext=(0, 8),
                ha="center", fontsize=8)
    _reference_lines(ax, baseline, candidate)
    ax.set_xlabel("trial")
    ax.set_ylabel("score")
    ax.set_title("score per trial")
    ax.set_xticks(xs if len(xs) <= 20 else xs[:: max(1, len(xs) // 10)])
    ax.set_ylim(-0.05, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def _plot_timeline(ax: Axes, events: list[dict[str, Any]], baseline: float | None, candidate: float | None) -> None:
    stamps = [float(e["ts"]) for e in events if isinstance(e.get("ts"), int | float)]
    t0 = min(stamps) if stamps else 0.0
    # where each stage first appears: a dotted line labelled with its name
    seen: set[str] = set()
    for e in events:
        stage, ts = str(e.get("stage", "?")), e.get("ts")
        if stage in seen or not isinstance(ts, int | float):
            continue
        seen.add(stage)
        x = float(ts) - t0
        ax.axvline(x, color=_STAGE_COLORS.get(stage, "tab:gray"), linestyle=":", linewidth=0.8, alpha=0.7)
        ax.text(x, 0.98, f" {stage}", rotation=90, va="top", ha="right", fontsize=7,
                transform=ax.get_xaxis_transform(), color=_STAGE_COLORS.get(stage, "black"))
    points: list[tuple[float, float, str]] = []
    for e in events:
        score, ts = _score(e.get("score")), e.get("ts")
        if score is None or not isinstance(ts, int | float):
            continue
        if e.get("stage") in _END and points and points[-1][1] == score:
            continue  # the final event repeats the candidate's score
        points.append((float(ts) - t0, score, str(e.get("stage", "?"))))
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], color="tab:blue", linewidth=1, alpha=0.5)
        for x, y, label in points:
            ax.scatter([x], [y], color=_STAGE_COLORS.get(label, "tab:blue"), zorder=3, s=30)
            ax.annotate(f"{label} {y:.3f}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8)
    else:
        ax.text(0.5, 0.5, "no scores yet", transform=ax.transAxes, ha="center", va="center", color="gray")
    _reference_lines(ax, baseline, candidate)
    end = max(stamps) - t0 if stamps else 1.0
    ax.set_xlim(-0.02 * max(end, 1e-3), max(end, 1e-3) * 1.08)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("score")
    ax.set_title("score over time")
    ax.grid(True, alpha=0.3)
    if baseline is not None or candidate is not None:
        ax.legend(loc="lower right", fontsize=8)


def _title(record: dict[str, Any]) -> str:
    summary = record.get("summary") or {}
    parts = [f"run {str(record.get('run_id', '?'))[:12]}", str(record.get("signature", "?")),
             str(record.get("optimizer", "?")), str(record.get("status", "?"))]
    if record.get("session"):
        parts.insert(2, f"session {record['session']}")
    if "promoted" in summary:
        parts.append("promoted" if summary["promoted"] else "not promoted")
    return " · ".join(parts)


def plot_run(record: dict[str, Any], events: list[dict[str, Any]], out: Path) -> Path:
    """Write a PNG chart of one optimization run and return its path.

    Args:
        record: the run record (``RunStore.get``); its ``summary`` (when finished) gives the
            trial scores (``summary["trials"]``, fractions in [0, 1]) and the baseline and
            candidate scores, otherwise ``baseline_score`` / ``candidate_score`` are used.
        events: the run's events (``{"stage", "done", "total", "score"?, "ts"}``), in order.
        out: where to write the PNG (parent directories are created).

    Returns:
        ``out``.
    """
    summary = record.get("summary") or {}
    trials = [s for t in (summary.get("trials") or record.get("trials") or []) if (s := _score(t)) is not None]
    baseline, candidate = _reference_scores(record)
    fig = Figure(figsize=(10, 8.5 if trials else 5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    if trials:
        top, bottom = fig.subplots(2, 1)
        _plot_trials(top, trials, baseline, candidate)
    else:
        bottom = fig.subplots(1, 1)
    _plot_timeline(bottom, events, baseline, candidate)
    fig.suptitle(_title(record), fontsize=11)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def plot_compare(records: list[dict[str, Any]], out: Path) -> Path:
    """Write a PNG of runs side by side and return its path: baseline and candidate bars per run.

    The candidate's bar carries the gain's interval (``summary["gain_ci"]``, placed on the baseline) as an
    error bar, and is labelled with the gain; a run not finished yet shows the scores it has.

    Args:
        records: run records (``RunRecord.to_json``), in the order to draw them.
        out: where to write the PNG (parent directories are created).
    """
    rows = [run_scores(r) for r in records]
    fig = Figure(figsize=(max(6.0, 1.8 * len(rows) + 2), 5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots(1, 1)
    width = 0.38
    for i, row in enumerate(rows):
        base, cand, ci = row["baseline"], row["candidate"], row["gain_ci"]
        if base is not None:
            ax.bar(i - width / 2, base, width, color=_BASELINE_COLOR, label="baseline" if i == 0 else None)
        if cand is None:
            continue
        err = None
        if ci is not None and base is not None:  # the interval of the gain, drawn around the candidate's score
            err = [[max(0.0, cand - (base + ci[0]))], [max(0.0, base + ci[1] - cand)]]
        ax.bar(i + width / 2, cand, width, color=_CANDIDATE_COLOR if row["promoted"] else "tab:olive",
               yerr=err, capsize=6, label="candidate" if i == 0 else None)
        if row["gain"] is not None:
            note = f"{row['gain']:+.3f}" + (f"\n[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
            ax.annotate(note, (i + width / 2, cand), textcoords="offset points", xytext=(0, 10), ha="center",
                        fontsize=8)
    ax.set_xticks(range(len(rows)), [f"{str(r['run_id'])[:8]}\n{r['optimizer']}" for r in rows], fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("score")
    ax.set_title(f"{len(rows)} runs: baseline vs candidate (gain and its interval)", fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
