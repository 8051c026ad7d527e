"""Benchmark the worker's hot path without Celery: ``Runtime.predict`` in process with the mock LM.

One prediction as a worker runs it (input validation, program lookup, the module call through the runner
under ``dspy.context``, usage accounting, output validation, the result JSON), timed in batches. With
``--compare PATH`` it times another checkout of the project too (an older commit, say
``git worktree add /tmp/base <rev>``), interleaving the two in fresh processes so machine noise falls
on both, and prints the ratio.

Usage::

    python benchmarks/bench_predict.py                          # this checkout
    python benchmarks/bench_predict.py --compare /tmp/base      # this checkout vs another, side by side
    python benchmarks/bench_predict.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def measure(batches: int, batch: int) -> dict[str, Any]:
    """Time ``Runtime.predict`` in this process (the checkout first on ``sys.path``)."""
    from dspex_tasks import signature
    from dspex_tasks.settings import Settings

    try:  # the layout since issue 12
        from dspex_tasks.dsl.signature import SignatureRegistry
        from dspex_tasks.programs.store import MemoryProgramStore
        from dspex_tasks.worker.runtime import Runtime
    except ImportError:  # the flat layout before it (for --compare against an older commit)
        from dspex_tasks.runtime import Runtime  # type: ignore[no-redef]
        from dspex_tasks.signature import SignatureRegistry  # type: ignore[no-redef]
        from dspex_tasks.store import MemoryProgramStore  # type: ignore[no-redef]

    reg = SignatureRegistry()
    sig = signature("question: str -> answer: str, confidence: confidence_score", name="qa", register=False)
    reg.add(sig)
    runtime = Runtime(Settings(), store=MemoryProgramStore(), signatures=reg)
    runtime.warm(publish=False, listen=False)
    for i in range(300):
        runtime.predict(sig, {"question": f"warm {i}"})
    per_call = []
    for b in range(batches):
        t0 = time.perf_counter()
        for i in range(batch):
            runtime.predict(sig, {"question": f"q{b} {i}"})
        per_call.append((time.perf_counter() - t0) / batch * 1e6)
    return {"median_us": round(statistics.median(per_call), 1), "batches_us": [round(x, 1) for x in per_call]}


def run_tree(tree: Path, batches: int, batch: int) -> dict[str, Any]:
    """``measure`` in a fresh process with ``tree`` first on the path (its own package, not this one)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    code = (f"import sys, json; sys.path.insert(0, {str(tree)!r}); sys.path.insert(1, {str(ROOT / 'benchmarks')!r}); "
            f"import bench_predict; print(json.dumps(bench_predict.measure({batches}, {batch})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tree,
                         timeout=600, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", type=Path, help="another checkout to time side by side")
    parser.add_argument("--rounds", type=int, default=5, help="fresh processes per tree (interleaved)")
    parser.add_argument("--batches", type=int, default=7)
    parser.add_argument("--batch", type=int, default=500, help="predictions per timed batch")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    trees = [("this", ROOT)] + ([("other", args.compare.resolve())] if args.compare else [])
    results: dict[str, list[float]] = {name: [] for name, _ in trees}
    for _ in range(args.rounds):
        for name, tree in trees:
            results[name].append(run_tree(tree, args.batches, args.batch)["median_us"])
    report: dict[str, Any] = {name: {"tree": str(tree), "median_us": statistics.median(results[name]),
                                     "rounds_us": results[name]} for name, tree in trees}
    if args.compare:
        report["ratio_this_to_other"] = round(report["this"]["median_us"] / report["other"]["median_us"], 3)
    if args.json:
        print(json.dumps(report))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Runtime.predict in process, mock LM (µs per prediction, median of rounds)")
    for col in ("checkout", "median µs", "rounds"):
        table.add_column(col)
    for name, tree in trees:
        table.add_row(f"{name}: {tree}", f"{report[name]['median_us']:.1f}",
                      ", ".join(f"{x:.0f}" for x in report[name]["rounds_us"]))
    Console().print(table)
    if args.compare:
        print(f"ratio this/other: {report['ratio_this_to_other']}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
