"""Benchmark one evaluation of an optimization run: dspex worker processes vs in-process ``dspy.Evaluate``.

The issue's check: wall time of one evaluation of 400 labelled examples with the HTTP mock LM at 300 ms
latency, with 1 worker process vs 3, against DSPy's own ``dspy.Evaluate(num_threads=...)`` at the same total
concurrency in one process. Aim: 3 processes >= 2.5x faster than 1, and no slower than in-process DSPy.

Two programs (``--program``): ``qa`` (default), one ``dspy.Predict`` over the ``signatures`` package's signature,
one LM call per example; and ``bench_two`` (issue 16), the 2-predictor ``TwoStep`` module of
``benchmarks/program_defs.py`` (``@program``, written as DSPy tutorials write modules), two LM calls per example
one after the other, so its latency bound is twice as long. Its workers import ``benchmarks.program_defs``
(``DSPEX_SIGNATURE_MODULES``, as ``bench_program.py`` arranges); in process it is a plain ``TwoStep()``.

One run starts a private Redis, the HTTP mock LM in its own OS process (scenario ``learns_from_demos``) and two
groups of dspex worker processes (``celery worker``, threads pool), each group on its own optimize queue:

* ``dspex 1 proc``: one worker process with ``W`` task threads; ``dspex 3 procs``: three such processes.
  An evaluation is measured as dspex does it inside a run: ``Client.optimize(program, trainset, valset=rows, ...)``
  with ``eval_chunk_size=C`` and ``num_threads=T``; the baseline stage fans out a chord of
  ``dspex.optimize.eval_chunk`` tasks (C rows each, T threads per chunk) merged by ``dspex.optimize.eval_merge``.
  The wall time is taken from the run's events: the first ``baseline`` event (emitted as the chord is launched)
  to the ``baseline`` event that carries the score (emitted by the merge). The run is then cancelled, so it
  stops at the next stage boundary; it never evaluates a candidate (``min_gain`` 2 forbids promotion anyway).
* ``dspy.Evaluate(N)``: the same rows, metric (``exact_match``) and program (the same two demos on every
  predictor) in this process, ``dspy.Evaluate(num_threads=N)`` over ``dspy.Predict`` (``qa``) or ``TwoStep()``
  (``bench_two``) with one ``dspy.LM("openai/mock", ...)``;
  N = 1 x W x T and 3 x W x T, the dspex totals. First plain DSPy, then with dspex's price-lookup memoization
  (``dspex_tasks.worker.dspy_patches.apply_dspy_speedups``, which every dspex worker applies) in this process.

The workers of the group not being measured are SIGSTOPped (no CPU); so are all workers while ``dspy.Evaluate``
runs. Each row is the median run. Scores are checked equal on every side (a failed call would score 0),
and so is the number of LM calls (n x calls per example: no retry, no extra call).

Usage::

    python benchmarks/bench_optimize.py                 # full run: 400 examples, 3 rounds per phase
    python benchmarks/bench_optimize.py --quick --json  # 120 examples, 1 round
    python benchmarks/bench_optimize.py --program bench_two --json  # the 2-predictor program
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before anything imports dspy / litellm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import (  # noqa: E402
    MockLMProcess,
    WorkerProcess,
    cleanup_all,
    install_signal_handlers,
    machine_info,
    new_log_dir,
)
from dspex_tasks.testing.mockgen import rule_answer  # noqa: E402
from dspex_tasks.testing.redis_server import RedisServer  # noqa: E402

SESSION = "bench-opt"
SCENARIO = "learns_from_demos"
CLK_TCK = os.sysconf("SC_CLK_TCK")
WRONG_EVERY = 4  # every 4th validation row carries a wrong label: the expected score is 0.75


# -- knobs and data -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Knobs:
    n: int
    latency_ms: float
    chunk_size: int  # eval_chunk_size C
    threads: int  # num_threads T per chunk
    concurrency: int  # W task threads per worker process
    procs: tuple[int, ...]
    rounds: int
    train_n: int
    program: str = "qa"
    calls: int = 1  # LM calls per example, one after the other

    def in_flight(self, procs: int) -> int:
        """LM calls dspex keeps in flight at most with ``procs`` worker processes."""
        return procs * self.concurrency * min(self.threads, self.chunk_size)

    def chunks(self) -> int:
        return math.ceil(self.n / self.chunk_size)

    def dspex_bound_s(self, procs: int) -> float:
        """Latency bound: chunks run in waves of procs x W, each chunk in ceil(C / T) waves of calls."""
        waves = math.ceil(self.chunks() / (procs * self.concurrency)) * math.ceil(self.chunk_size / self.threads)
        return waves * self.calls * self.latency_ms / 1000.0

    def evaluate_bound_s(self, threads: int) -> float:
        return math.ceil(self.n / threads) * self.calls * self.latency_ms / 1000.0


def question(i: int, prefix: str = "") -> str:
    return f"what is {prefix}item {i} in the benchmark set"


def val_rows(n: int) -> list[dict[str, Any]]:
    """Labelled with the rule the mock applies once demos are in the prompt; every 4th label is wrong."""
    rows = []
    for i in range(n):
        q = question(i)
        right = rule_answer({"question": q})
        rows.append({"question": q, "answer": right if i % WRONG_EVERY != WRONG_EVERY - 1 else "not " + right})
    return rows


def train_rows(n: int) -> list[dict[str, Any]]:
    return [{"question": (q := question(i, "training ")), "answer": rule_answer({"question": q})} for i in range(n)]


DEMOS = train_rows(2)  # the session's current program: two labelled demos


def expected_score(n: int) -> float:
    return sum(1 for i in range(n) if i % WRONG_EVERY != WRONG_EVERY - 1) / n


@dataclass(frozen=True)
class Target:
    """A program to evaluate: what workers import to serve it, its session state, and the same in process."""

    name: str
    modules: str  # DSPEX_SIGNATURE_MODULES of its workers
    calls: int  # LM calls per example

    def state(self) -> dict[str, Any]:
        """The session's current program: two labelled demos on every predictor, so the mock follows its rule."""
        if self.name == "qa":
            return {"demos": DEMOS}
        from benchmarks.program_defs import NOTES

        return {"draft": {"demos": [{"question": d["question"], "query": rule_answer({"question": d["question"]})}
                                    for d in DEMOS]},
                "answer": {"demos": [{"question": d["question"], "notes": NOTES[:1], "answer": d["answer"]}
                                     for d in DEMOS]}}

    def module(self) -> Any:
        """The same program in this process, built as a DSPy user builds it, with :meth:`state`'s demos."""
        import dspy

        state = self.state()
        if self.name == "qa":
            import signatures  # noqa: F401 - registers qa
            from dspex_tasks.dsl.signature import registry

            qa = dspy.Predict(registry.get("qa").to_dspy())
            qa.demos = [dspy.Example(**d) for d in state["demos"]]
            return qa
        from benchmarks.program_defs import TwoStep

        two = TwoStep()
        for name, predictor in two.named_predictors():
            predictor.demos = [dspy.Example(**d) for d in state[name]["demos"]]
        return two


#: The mock answers a predictor by the rule once demos are in its prompt; for ``TwoStep`` the draft's query
#: never names a note, so the answer step always sees NOTES[:1] and answers by the rule from the question.
TARGETS = {"qa": Target("qa", "signatures", 1), "bench_two": Target("bench_two", "benchmarks.program_defs", 2)}


# -- results ------------------------------------------------------------------------------------
@dataclass
class Measurement:
    kind: str
    phase: str
    round: int
    wall_s: float
    score: float
    lm_calls: int
    max_in_flight: int
    cpu_ms_per_example: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    scenario: str
    knobs: str
    wall_s: float
    examples_per_s: float
    bound_s: float
    max_in_flight: int
    cpu_ms: float
    score: float
    ratio: float | None = None
    ratio_label: str = ""
    aim: str = ""
    met: bool | None = None


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process (all its threads) from /proc; 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def median(runs: list[Measurement]) -> Measurement:
    """The run with the median wall time (the slower middle one for an even count)."""
    ordered = sorted(runs, key=lambda m: m.wall_s)
    return ordered[len(ordered) // 2]


# -- the dspex side -------------------------------------------------------------------------------
class WorkerGroup:
    """``procs`` dspex worker processes consuming their own optimize queue, and a client sending to it."""

    def __init__(self, procs: int, *, knobs: Knobs, redis_url: str, namespace: str, mock: MockLMProcess,
                 log_dir: Path) -> None:
        from dspex_tasks.client import Client
        from dspex_tasks.settings import load_settings

        self.procs = procs
        self.queue = f"bench.optimize.p{procs}"
        env = {"DSPEX_NAMESPACE": namespace, "DSPEX_SIGNATURE_MODULES": TARGETS[knobs.program].modules,
               "DSPEX_LM": "openai/mock",
               "DSPEX_LM_API_BASE": mock.api_base, "DSPEX_LM_API_KEY": "sk-bench", "DSPEX_LM_NUM_RETRIES": "0",
               "DSPEX_WORKER_POOL": "threads", "DSPEX_WORKER_CONCURRENCY": str(knobs.concurrency),
               "DSPEX_OPTIMIZE_QUEUE": self.queue}
        self.workers = [WorkerProcess("workers.app", redis_url=redis_url, queues=self.queue,
                                      concurrency=knobs.concurrency, log_dir=log_dir, name=f"opt-p{procs}-{i}",
                                      env=env) for i in range(procs)]
        self.client = Client(settings=load_settings(redis_url=redis_url, namespace=namespace,
                                                    optimize_queue=self.queue))

    def wait_ready(self) -> None:
        for w in self.workers:
            w.wait_ready()

    def pause(self) -> None:
        for w in self.workers:
            w.pause()

    def resume(self) -> None:
        for w in self.workers:
            w.resume()

    def close(self) -> None:
        self.client.close()
        for w in self.workers:
            w.stop()

    def cpu_s(self) -> float:
        return sum(cpu_s(w.pid) for w in self.workers)


def dspex_eval(group: WorkerGroup, mock: MockLMProcess, knobs: Knobs, rows: list[dict[str, Any]],
               train: list[dict[str, Any]], *, phase: str, round_: int) -> Measurement:
    """One run's baseline evaluation, timed from its events; the run is cancelled before it compiles."""
    params = {"eval_chunk_size": knobs.chunk_size, "num_threads": knobs.threads, "max_bootstrapped_demos": 0,
              "max_labeled_demos": 2, "min_gain": 2.0}  # min_gain > 1: never promotes, whatever happens
    group.resume()
    mock.reset_stats()
    cpu0, mock0, t_submit = group.cpu_s(), cpu_s(mock.pid), time.time()
    run = group.client.optimize(knobs.program, train, valset=rows, session=SESSION, optimizer="bootstrap_few_shot",
                                params=params)
    events: Iterator[dict[str, Any]] = iter(run.events(timeout=900))
    first: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    seen: list[dict[str, Any]] = []
    for event in events:
        seen.append(event)
        if event["stage"] in ("failed", "cancelled", "done"):
            raise RuntimeError(f"run {run.id} ended before its baseline score: {event!r}; events {seen!r}")
        if event["stage"] != "baseline":
            continue
        if first is None:
            first = event
        if "score" in event:
            last = event
            run.cancel()  # only now: a cancel also stops evaluation chunks that have not started
            break
    cpu1, mock1 = group.cpu_s(), cpu_s(mock.pid)
    stats = mock.stats()
    tail = [e["stage"] for e in events]  # drain: wait until the run has stopped
    group.pause()
    if first is None or last is None:
        raise RuntimeError(f"run {run.id}: no baseline score in its events")
    if not tail or tail[-1] != "cancelled":
        raise RuntimeError(f"run {run.id} did not stop at the next stage: {tail}")
    n = len(rows)
    return Measurement(
        kind=f"dspex{group.procs}", phase=phase, round=round_, wall_s=float(last["ts"]) - float(first["ts"]),
        score=float(last["score"]), lm_calls=int(last.get("lm_calls") or 0), max_in_flight=stats["max_in_flight"],
        cpu_ms_per_example={"workers": round((cpu1 - cpu0) * 1000 / n, 3), "mock": round((mock1 - mock0) * 1000 / n, 3)},
        extra={"run_id": run.id, "submit_to_score_s": round(float(last["ts"]) - t_submit, 4),
               "submit_to_baseline_s": round(float(first["ts"]) - t_submit, 4), "mock_requests": stats["requests"],
               "mock_errors": stats["errors"]})


# -- the dspy.Evaluate side ----------------------------------------------------------------------------
class InProcess:
    """``dspy.Evaluate`` in this process over the same program, rows and metric."""

    def __init__(self, mock: MockLMProcess, rows: list[dict[str, Any]], target: Target) -> None:
        import logging

        import dspy

        from dspex_tasks.optimize.metrics import exact_match

        logging.getLogger("dspy.evaluate.evaluate").setLevel(logging.WARNING)  # its per-run "Average Metric"
        self.dspy = dspy
        self.mock = mock
        self.metric = exact_match
        self.lm = dspy.LM("openai/mock", api_base=mock.api_base, api_key="sk-bench", cache=False, num_retries=0)
        self.program = target.module()
        self.devset = [dspy.Example(**r).with_inputs("question") for r in rows]

    def run(self, threads: int, *, devset: list[Any] | None = None, phase: str = "", round_: int = 0) -> Measurement:
        dspy = self.dspy
        devset = self.devset if devset is None else devset
        evaluate = dspy.Evaluate(devset=devset, metric=self.metric, num_threads=threads, display_progress=False)
        self.mock.reset_stats()
        proc0, mock0 = time.process_time(), cpu_s(self.mock.pid)
        t0 = time.perf_counter()
        with dspy.context(lm=self.lm):
            result = evaluate(self.program)
        wall = time.perf_counter() - t0
        proc1, mock1 = time.process_time(), cpu_s(self.mock.pid)
        stats = self.mock.stats()
        scores = [float(s) for _, _, s in result.results]
        n = len(devset)
        return Measurement(
            kind=f"evaluate{threads}", phase=phase, round=round_, wall_s=wall, score=sum(scores) / n,
            lm_calls=stats["requests"], max_in_flight=stats["max_in_flight"],
            cpu_ms_per_example={"bench_process": round((proc1 - proc0) * 1000 / n, 3),
                                "mock": round((mock1 - mock0) * 1000 / n, 3)},
            extra={"mock_errors": stats["errors"], "dspy_score_pct": float(result.score)})


# -- the benchmark ----------------------------------------------------------------------------------------
def run_benchmark(knobs: Knobs, redis_url: str, log_dir: Path) -> dict[str, list[Measurement]]:
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    target = TARGETS[knobs.program]
    rows, train = val_rows(knobs.n), train_rows(knobs.train_n)
    mock = MockLMProcess(latency_ms=knobs.latency_ms, log_dir=log_dir)
    groups = {p: WorkerGroup(p, knobs=knobs, redis_url=redis_url, namespace=namespace, mock=mock, log_dir=log_dir)
              for p in knobs.procs}
    runs: dict[str, list[Measurement]] = {}

    def keep(m: Measurement) -> None:
        runs.setdefault(m.kind, []).append(m)
        print(f"  {m.phase:8s} round {m.round}  {m.kind:11s} {m.wall_s:7.3f} s  score {m.score:.4f}  "
              f"in flight {m.max_in_flight:3d}  cpu ms/ex {m.cpu_ms_per_example}", flush=True)

    try:
        mock.wait_ready()
        mock._request("/_control", {"scenario": SCENARIO})
        for g in groups.values():
            g.wait_ready()
        some = next(iter(groups.values())).client
        deadline = time.monotonic() + 30
        while target.name not in some.signatures(refresh=True):
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers did not publish {target.name}")
            time.sleep(0.2)
        some.programs.put(SESSION, target.name, target.state(), signature=target.name)
        local = InProcess(mock, rows, target)
        concurrencies = {p: knobs.in_flight(p) for p in knobs.procs}

        print("[warm-up, untimed]", flush=True)
        for p, g in groups.items():  # connections, lazy imports, the program cache, on every process
            for other in groups.values():
                other.pause()
            dspex_eval(g, mock, knobs, rows[:concurrencies[p] * 2], train, phase="warm-up", round_=0)
        for c in concurrencies.values():
            local.run(c, devset=local.devset[:c * 2])

        def dspex_all(phase: str, r: int, order: list[int]) -> None:
            for p in order:
                for other in groups.values():
                    other.pause()
                keep(dspex_eval(groups[p], mock, knobs, rows, train, phase=phase, round_=r))

        def evaluate_all(phase: str, r: int, order: list[int], suffix: str = "") -> None:
            for g in groups.values():
                g.pause()
            for p in order:
                m = local.run(concurrencies[p], phase=phase, round_=r)
                m.kind += suffix
                keep(m)

        procs = list(knobs.procs)
        print("[phase 1: plain DSPy in this process]", flush=True)
        for r in range(1, knobs.rounds + 1):
            dspex_all("plain", r, procs)
            evaluate_all("plain", r, procs)
        from dspex_tasks.worker.dspy_patches import apply_dspy_speedups

        apply_dspy_speedups()  # irreversible in this process: every plain run came before it
        print("[phase 2: DSPy with the price lookup memoized, as in the workers]", flush=True)
        for r in range(1, knobs.rounds + 1):  # reverse order, so drift over time does not favour one side
            evaluate_all("memoized", r, procs[::-1], suffix="m")
            dspex_all("memoized", r, procs[::-1])
    finally:
        for g in groups.values():
            g.close()
        mock.stop()
    return runs


def build_rows(knobs: Knobs, runs: dict[str, list[Measurement]]) -> list[Row]:
    lo, hi = min(knobs.procs), max(knobs.procs)
    med = {kind: median(ms) for kind, ms in runs.items()}
    n = knobs.n

    def row(kind: str, scenario: str, knob_text: str, bound: float, cpu_key: str) -> Row:
        m = med[kind]
        return Row(scenario, knob_text, m.wall_s, n / m.wall_s, bound, m.max_in_flight,
                   m.cpu_ms_per_example[cpu_key], m.score)

    def per_call(procs: int) -> str:
        return f"K={procs} x W={knobs.concurrency} x T={knobs.threads} = {knobs.in_flight(procs)}, C={knobs.chunk_size}"

    rows: list[Row] = []
    for p in knobs.procs:
        label = f"dspex, {p} worker process" + ("es" if p > 1 else "")
        rows.append(row(f"dspex{p}", label, per_call(p), knobs.dspex_bound_s(p), "workers"))
    if lo != hi:
        r = rows[-1]
        r.ratio, r.ratio_label = med[f"dspex{lo}"].wall_s / med[f"dspex{hi}"].wall_s, f"speed-up over {lo} proc"
        r.aim, r.met = ">= 2.5", r.ratio >= 2.5
    for suffix, name in (("", "plain"), ("m", "price lookup memoized")):
        for p in knobs.procs:
            c = knobs.in_flight(p)
            r = row(f"evaluate{c}{suffix}", f"dspy.Evaluate({c}), {name}", f"num_threads={c}",
                    knobs.evaluate_bound_s(c), "bench_process")
            r.ratio = r.wall_s / med[f"dspex{p}"].wall_s
            r.ratio_label = f"dspex {p} proc vs this (>1: dspex faster)"
            if p == hi and suffix == "":
                r.aim, r.met = ">= 1.0 (no slower)", r.ratio >= 1.0
            rows.append(r)
    return rows


# -- output -----------------------------------------------------------------------------------------------------
def render(rows: list[Row], knobs: Knobs) -> None:
    from rich.console import Console
    from rich.table import Table

    calls = f"{knobs.calls} LM calls" if knobs.calls > 1 else "1 LM call"
    table = Table(title=f"one evaluation of {knobs.n} examples of {knobs.program} ({calls} each), "
                        f"HTTP mock LM at {knobs.latency_ms:.0f} ms")
    cols = (("scenario", "left"), ("knobs (in flight)", "left"), ("wall s", "right"), ("examples/s", "right"),
            ("latency bound s", "right"), ("max in flight", "right"), ("CPU ms/ex", "right"), ("score", "right"),
            ("ratio", "right"), ("ratio is", "left"), ("aim", "left"))
    for col, justify in cols:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}"
        aim = (r.aim + ("" if r.met is None else (" met" if r.met else " MISSED"))) or "—"
        table.add_row(r.scenario, r.knobs, f"{r.wall_s:.3f}", f"{r.examples_per_s:.1f}", f"{r.bound_s:.2f}",
                      str(r.max_in_flight), f"{r.cpu_ms:.2f}", f"{r.score:.4f}", ratio, r.ratio_label or "—", aim)
    Console(width=240).print(table)
    print("CPU ms/ex: dspex rows, all worker processes of the group; dspy.Evaluate rows, this process. "
          f"Latency bound: waves of LM calls x {knobs.calls} call(s) per example x latency, no CPU.")


def round_ratios(knobs: Knobs, runs: dict[str, list[Measurement]]) -> dict[str, list[float]]:
    """The same ratios as the table, per round (runs of one phase and round were taken back to back)."""
    lo, hi = min(knobs.procs), max(knobs.procs)
    by = {(m.kind, m.phase, m.round): m.wall_s for ms in runs.values() for m in ms}
    pairs = {f"dspex{hi} speed-up over dspex{lo}": (f"dspex{lo}", f"dspex{hi}")} if lo != hi else {}
    for p in knobs.procs:
        c = knobs.in_flight(p)
        pairs[f"dspex{p} vs evaluate{c}"] = (f"evaluate{c}", f"dspex{p}")
        pairs[f"dspex{p} vs evaluate{c}m"] = (f"evaluate{c}m", f"dspex{p}")
    out: dict[str, list[float]] = {}
    for label, (slow, fast) in pairs.items():
        out[label] = [round(by[(slow, ph, r)] / by[(fast, ph, r)], 3) for ph in ("plain", "memoized")
                      for r in range(1, knobs.rounds + 1) if (slow, ph, r) in by and (fast, ph, r) in by]
    return {k: v for k, v in out.items() if v}


def check_scores(knobs: Knobs, runs: dict[str, list[Measurement]]) -> list[str]:
    """Every run of every kind must score what the labels imply (a failed LM call scores 0), with exactly
    ``calls`` LM calls per example (no retry, no extra call)."""
    want, calls = expected_score(knobs.n), knobs.n * knobs.calls
    return [*(f"{m.kind} {m.phase} round {m.round}: score {m.score:.4f} != {want:.4f}"
              for ms in runs.values() for m in ms if abs(m.score - want) > 1e-9),
            *(f"{m.kind} {m.phase} round {m.round}: {m.lm_calls} LM calls != {calls} ({knobs.calls} per example)"
              for ms in runs.values() for m in ms if m.lm_calls != calls)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="120 examples, one round per phase")
    parser.add_argument("--json", action="store_true", help="print a JSON document at the end")
    parser.add_argument("--program", choices=sorted(TARGETS), default="qa",
                        help="qa: one Predict, 1 LM call per example; bench_two: 2-predictor TwoStep, 2 calls")
    parser.add_argument("--n", type=int, default=None, help="validation examples (default 400, quick 120)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per phase (default 3, quick 1)")
    parser.add_argument("--latency-ms", type=float, default=300.0)
    parser.add_argument("--chunk-size", type=int, default=8, help="eval_chunk_size C")
    parser.add_argument("--threads", type=int, default=8, help="num_threads T per chunk (at most 64)")
    parser.add_argument("--concurrency", type=int, default=4, help="task threads W per worker process")
    parser.add_argument("--procs", default="1,3", help="worker process counts to compare")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    knobs = Knobs(n=args.n or (120 if args.quick else 400), latency_ms=args.latency_ms, chunk_size=args.chunk_size,
                  threads=args.threads, concurrency=args.concurrency,
                  procs=tuple(sorted({int(p) for p in args.procs.split(",") if p.strip()})),
                  rounds=args.rounds or (1 if args.quick else 3), train_n=8, program=args.program,
                  calls=TARGETS[args.program].calls)
    install_signal_handlers()
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd() + os.sep) else sys.executable
    command = " ".join(shlex.quote(a) for a in [exe, *sys.argv])
    machine = machine_info()
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    print("knobs:   " + ", ".join(f"{k}={v}" for k, v in asdict(knobs).items())
          + f"; dspex in flight {', '.join(f'{p} proc: {knobs.in_flight(p)}' for p in knobs.procs)}; "
          f"expected score {expected_score(knobs.n):.4f}", flush=True)
    log_dir = new_log_dir()
    print(f"logs:    {log_dir}", flush=True)
    redis = RedisServer()
    try:
        redis.start()
        runs = run_benchmark(knobs, redis.url, log_dir)
    except KeyboardInterrupt:
        print("interrupted; stopping workers, mock LM and Redis", file=sys.stderr)
        return 130
    finally:
        cleanup_all()
        redis.stop()
    rows = build_rows(knobs, runs)
    render(rows, knobs)
    per_round = round_ratios(knobs, runs)
    for label, values in per_round.items():
        print(f"per round: {label}: {' / '.join(f'{v:.2f}' for v in values)}")
    problems = check_scores(knobs, runs)
    for p in problems:
        print(f"CHECK FAILED: {p}", file=sys.stderr)
    if not problems:
        print(f"scores: every run of every kind scored {expected_score(knobs.n):.4f}, as the labels imply, "
              f"with {knobs.n * knobs.calls} LM calls ({knobs.calls} per example)")
    if args.json:
        doc = {"command": command, "machine": machine, "knobs": asdict(knobs), "rows": [asdict(r) for r in rows],
               "ratios_per_round": per_round, "runs": {k: [asdict(m) for m in ms] for k, ms in runs.items()},
               "score_problems": problems}
        print(json.dumps(doc, indent=2, default=str))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
