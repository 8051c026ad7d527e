"""Benchmark the signature layer: definition, output validation and one DSPy call per mock LM.

Measures, in one run:

* defining DSPex's ComplexAnalysis signature (parse + pydantic models, ``register=False``), in both spellings,
  and the one-off ``to_dspy()`` build on top;
* ``validate_outputs`` on a typical ComplexAnalysis answer;
* one ``dspy.Predict`` call through DSPy's ChatAdapter with the project's :class:`dspex_tasks.testing.mock_lm.MockLM`,
  and the same module with ``dspy.utils.DummyLM``, so the mock's overhead shows as a ratio.

DSPex (the Elixir seed) reported about 2 ms per signature compile and 1 ms per mock execution; those figures
are printed next to ours for orientation only (different runtime, different machine).

Usage::

    python benchmarks/bench_signatures.py                 # rich table
    python benchmarks/bench_signatures.py --iterations 5000 --calls 500
    python benchmarks/bench_signatures.py --json          # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dspex_tasks import Signature, signature  # noqa: E402
from dspex_tasks.dsl.types import parse_type  # noqa: E402

COMPLEX_ANALYSIS = (
    "text: str, context: list[str] -> analysis: reasoning_chain, confidence: confidence_score, entities: list[entity]"
)
COMPLEX_ANALYSIS_DSPEX = (
    "text: :string, context: {:list, :string} -> analysis: :reasoning_chain, confidence: :confidence_score, "
    "entities: {:list, :entity}"
)
INSTRUCTIONS = "Analyze the text using the context: reasoning steps, a confidence in [0, 1] and the named entities."
INPUTS: dict[str, Any] = {
    "text": "Ada Lovelace met Charles Babbage in London in 1833.",
    "context": ["Babbage designed the Analytical Engine.", "Lovelace wrote its first program."],
}
OUTPUTS: dict[str, Any] = {
    "analysis": ["Two people are named.", "They met in a city, in a given year.", "So this is a historical note."],
    "confidence": "0.85",  # as an LM writes it: text, coerced to a float
    "entities": [
        {"text": "Ada Lovelace", "type": "PERSON", "start": 0, "end": 12},
        {"text": "Charles Babbage", "type": "PERSON", "start": 17, "end": 32},
        {"text": "London", "type": "LOC"},
        {"text": "1833", "type": "DATE"},
    ],
}
# DSPex's own figures (its README / benchmarks), shown for orientation.
DSPEX_REFERENCE_US = {"define": 2000.0, "predict": 1000.0}


def measure(fn: Callable[[], Any], iterations: int, warmup: int = 3) -> dict[str, float]:
    """Time ``fn`` ``iterations`` times with perf_counter_ns; statistics in microseconds."""
    for _ in range(warmup):
        fn()
    samples: list[int] = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - start)
    samples.sort()
    us = [s / 1000.0 for s in samples]
    p95_index = min(len(us) - 1, max(0, int(round(0.95 * len(us))) - 1))
    return {
        "iterations": iterations,
        "median_us": statistics.median(us),
        "p95_us": us[p95_index],
        "mean_us": statistics.fmean(us),
        "min_us": us[0],
    }


def define(spec: str) -> Callable[[], Signature]:
    return lambda: signature(spec, name="complex_analysis", instructions=INSTRUCTIONS, register=False)


def parse_only(sig: Signature) -> Callable[[], Any]:
    """Just the DSL parser over every field's type: the part of defining that is ours, without pydantic."""
    types = [*sig.input_fields.values(), *sig.output_fields.values()]
    return lambda: [parse_type(t) for t in types]


def define_and_build(spec: str) -> Callable[[], Any]:
    return lambda: define(spec)().to_dspy()


def bench_predict(sig: Signature, calls: int) -> dict[str, Any]:
    """One dspy.Predict module, called under each LM through the same ChatAdapter."""
    import dspy
    from dspy.utils import DummyLM

    from dspex_tasks.testing.mock_lm import MockLM

    module = dspy.Predict(sig.to_dspy())
    adapter = dspy.ChatAdapter()
    mock = MockLM(seed=0)
    # Dict mode: answers whenever the key is in the last message, so the answer is never used up.
    answer = {**OUTPUTS, "analysis": json.dumps(OUTPUTS["analysis"]), "entities": json.dumps(OUTPUTS["entities"])}
    dummy = DummyLM({INPUTS["text"]: answer}, adapter=adapter)

    def call(lm: Any) -> Callable[[], Any]:
        def run() -> Any:
            with dspy.context(lm=lm, adapter=adapter):
                return module(**INPUTS)

        return run

    # Both answers must parse into the signature's types, or the timings compare failures.
    for lm in (mock, dummy):
        prediction = call(lm)()
        sig.validate_outputs({name: prediction[name] for name in sig.output_fields})

    results = {"mock_lm": measure(call(mock), calls), "dummy_lm": measure(call(dummy), calls)}
    results["ratio_mock_to_dummy"] = results["mock_lm"]["median_us"] / results["dummy_lm"]["median_us"]
    # What a dspex worker runs: the same call after its DSPy memoizations (dspex_tasks.worker.dspy_patches).
    from dspex_tasks.worker.dspy_patches import apply_dspy_speedups

    apply_dspy_speedups()  # irreversible in this process: the plain runs came first
    results["mock_lm_worker"] = measure(call(mock), calls)
    results["dspy_version"] = dspy.__version__
    return results


def run(iterations: int, calls: int) -> dict[str, Any]:
    sig = define(COMPLEX_ANALYSIS)()
    assert sig == define(COMPLEX_ANALYSIS_DSPEX)(), "both spellings must define the same signature"
    results: dict[str, Any] = {
        "parse_types": measure(parse_only(sig), iterations),
        "define_python": measure(define(COMPLEX_ANALYSIS), iterations),
        "define_dspex": measure(define(COMPLEX_ANALYSIS_DSPEX), iterations),
        "define_and_to_dspy": measure(define_and_build(COMPLEX_ANALYSIS), max(1, iterations // 5)),
        "validate_outputs": measure(lambda: sig.validate_outputs(OUTPUTS), iterations),
    }
    predict = bench_predict(sig, calls)
    results["predict_mock_lm"] = predict["mock_lm"]
    results["predict_dummy_lm"] = predict["dummy_lm"]
    results["predict_mock_lm_worker"] = predict["mock_lm_worker"]
    return {
        "spec": COMPLEX_ANALYSIS,
        "results": results,
        "ratios": {
            "predict_mock_lm_to_dummy_lm": predict["ratio_mock_to_dummy"],
            "define_to_dspex_reference": results["define_python"]["median_us"] / DSPEX_REFERENCE_US["define"],
            "predict_mock_lm_to_dspex_reference": results["predict_mock_lm"]["median_us"]
            / DSPEX_REFERENCE_US["predict"],
            "predict_worker_to_dspex_reference": results["predict_mock_lm_worker"]["median_us"]
            / DSPEX_REFERENCE_US["predict"],
        },
        "dspex_reference_us": DSPEX_REFERENCE_US,
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "dspy": predict["dspy_version"],
        },
    }


ROWS = [
    ("parse_types", "parse the 5 types only", None),
    ("define_python", "define (Python spelling)", "define"),
    ("define_dspex", "define (DSPex spelling)", "define"),
    ("define_and_to_dspy", "define + to_dspy()", "define"),
    ("validate_outputs", "validate_outputs", None),
    ("predict_mock_lm", "Predict call, MockLM", "predict"),
    ("predict_dummy_lm", "Predict call, DummyLM", "predict"),
    ("predict_mock_lm_worker", "Predict call, MockLM, as in a worker", "predict"),
]


def render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="dspex-tasks signature benchmark: DSPex's ComplexAnalysis")
    table.add_column("measurement")
    table.add_column("n", justify="right")
    table.add_column("median µs", justify="right")
    table.add_column("p95 µs", justify="right")
    table.add_column("mean µs", justify="right")
    table.add_column("DSPex reported", justify="right")
    for key, label, ref in ROWS:
        r = report["results"][key]
        reference = f"~{report['dspex_reference_us'][ref] / 1000:g} ms" if ref else "-"
        table.add_row(
            label, str(r["iterations"]), f"{r['median_us']:.1f}", f"{r['p95_us']:.1f}", f"{r['mean_us']:.1f}", reference
        )
    console = Console(width=max(Console().width, 100))
    console.print(table)
    console.print(f"[dim]spec: {escape(report['spec'])}[/dim]")
    ratios = report["ratios"]
    console.print(f"MockLM / DummyLM (median per Predict call): [bold]{ratios['predict_mock_lm_to_dummy_lm']:.2f}x[/bold]")
    console.print(f"define / DSPex's ~2 ms compile: {ratios['define_to_dspex_reference']:.3f}x")
    console.print(f"MockLM Predict call / DSPex's ~1 ms mock execution: {ratios['predict_mock_lm_to_dspex_reference']:.2f}x"
                  f" (as in a worker, with dspex's DSPy memoizations: {ratios['predict_worker_to_dspex_reference']:.2f}x)")
    env = report["environment"]
    console.print(f"[dim]python {env['python']}, dspy {env['dspy']}, {env['cpus']} CPUs, {env['platform']}[/dim]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=2000, help="timed runs for definition and validation")
    parser.add_argument("--calls", type=int, default=200, help="timed dspy.Predict calls per LM")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.calls < 1:
        parser.error("--iterations and --calls must be >= 1")
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)  # DSPy's legacy-LM notice, once per call
    report = run(args.iterations, args.calls)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
