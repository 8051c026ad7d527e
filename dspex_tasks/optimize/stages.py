"""The stages of an optimization run, each its own short Celery task on ``dspex.optimize``.

    load -> baseline (chord of eval chunks) -> compile -> candidate (chord) -> decide

Every stage stores its output as a checkpoint before it advances, and advancing
is once-only, so a redelivered stage (a worker killed mid-run) resumes from the
last checkpoint and a duplicate delivery changes nothing. A stage holds the
run's lease (renewed by a heartbeat) while it works, so the same stage never
runs twice at once. Promotion writes the program with the run id as an
idempotency token: at most one new version per run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import chord

from .. import keys, wire
from ..errors import BudgetExceeded, DspexError, LMAuthError, ProgramNotFound, ValidationError
from ..observability.prometheus import record_lm, record_run
from ..observability.redact import redact_error
from ..programs.state import dump_program, load_program
from .datasets import DatasetStore, split, validate_rows
from .gate import decide
from .metrics import get_metric, metric_score
from .optimizers import chunk_handler, get_optimizer, parse_common
from .runs import RunRecord, RunStatus, RunStore, Stage, send_stage

__all__ = ["PLAN", "Stages", "register_optimize_tasks"]

log = logging.getLogger(__name__)

#: The stages a run's ``dspex.optimize.stage`` task goes through, in order.
PLAN = (Stage.LOAD, Stage.BASELINE, Stage.COMPILE, Stage.CANDIDATE, Stage.DECIDE)
#: The program state each evaluation scores (a checkpoint name).
EVALS = {Stage.BASELINE: "baseline_state", Stage.CANDIDATE: "candidate"}
LEASE_RETRY_S = 2.0
#: A fanned-out chunk's claim: far longer than a chunk runs, so only a dead worker's claim lapses.
CHUNK_CLAIM_TTL_S = 600
CHUNK_POLL_S = 0.05


class _Progress:
    """DSPy callback: counts LM calls and emits throttled progress events for the current stage."""

    def __init__(self, emit: Any, stage: str, total: int | None, every_s: float = 0.5) -> None:
        from dspy.utils.callback import BaseCallback

        self.calls = 0
        self._lock = threading.Lock()
        self._last = 0.0
        outer = self

        class Callback(BaseCallback):  # type: ignore[misc]
            def on_lm_end(self, call_id: str, outputs: Any, exception: Any = None) -> None:
                with outer._lock:
                    outer.calls += 1
                    now = time.monotonic()
                    due = now - outer._last >= every_s
                    if due:
                        outer._last = now
                if due:
                    emit(stage, done=min(outer.calls, total or outer.calls), total=total)

        self.callback = Callback()


def progress_line(event: dict[str, Any]) -> str:
    """``compile 12/40 · score 0.750 · running miprov2``: a run event as one line for Flower's Result column."""
    parts = [str(event.get("stage", ""))]
    if event.get("total"):
        parts[0] += f" {event.get('done', 0)}/{event['total']}"
    if isinstance(event.get("score"), int | float):
        parts.append(f"score {float(event['score']):.3f}")
    if event.get("lm_calls"):
        parts.append(f"{event['lm_calls']} LM calls")
    if event.get("message"):
        parts.append(str(event["message"])[:120])
    return " · ".join(parts)


class Stages:
    """Stage logic bound to one worker app (its runtime, stores and tasks)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.settings = app.dspex_settings
        # The program each evaluation scores, built once per (run, baseline|candidate) in this process: every
        # chunk of an evaluation scores the same state, and building it is most of dspex's own CPU per chunk.
        self._programs: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._programs_lock = threading.Lock()
        # Stage dispatch: each returns True when the run should advance to the next stage now.
        self.table: dict[Stage, Callable[[Any, str, RunRecord], bool]] = {
            Stage.LOAD: self.stage_load,
            Stage.BASELINE: lambda task, run_id, rec: self._launch_eval(task, run_id, Stage.BASELINE),
            Stage.COMPILE: self.stage_compile,
            Stage.CANDIDATE: lambda task, run_id, rec: self._launch_eval(task, run_id, Stage.CANDIDATE),
            Stage.DECIDE: self.stage_decide,
        }

    @property
    def runtime(self) -> Any:
        return self.app.runtime

    @property
    def runs(self) -> RunStore:
        return RunStore(redis=self.runtime.redis, namespace=self.settings.namespace)

    # -- plumbing -------------------------------------------------------------
    def emit(self, run_id: str, stage: str, task: Any = None, **fields: Any) -> None:
        rec_score = fields.pop("score", None)
        event = {"stage": str(stage), "done": fields.pop("done", 0), "total": fields.pop("total", None), **fields}
        if rec_score is not None:
            event["score"] = rec_score
        event = self.runs.emit(run_id, event)
        if task is not None and getattr(task.request, "id", None):
            with contextlib.suppress(Exception):  # a mirror for Flower; never fail a stage over it
                meta = {"run_id": run_id, **event}
                task.update_state(state="PROGRESS", meta=meta)
                # Flower's task list follows events, not the result backend: say it there too, with a line for
                # its Result column while the stage runs (the task's real result replaces it when it ends)
                task.send_event("task-progress", state="PROGRESS", result=progress_line(event),
                                **{k: v for k, v in meta.items() if k not in ("state", "result")})

    @contextlib.contextmanager
    def lease(self, run_id: str) -> Iterator[bool]:
        """Hold the run's lease while a stage works; yields False when another worker holds it."""
        runs, token, ttl = self.runs, uuid.uuid4().hex, self.settings.lease_ttl_s
        if not runs.acquire_lease(run_id, token, ttl):
            yield False
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(ttl / 3):
                with contextlib.suppress(Exception):
                    runs.renew_lease(run_id, token, ttl)

        t = threading.Thread(target=beat, name=f"dspex-lease-{run_id[:8]}", daemon=True)
        t.start()
        try:
            yield True
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                runs.release_lease(run_id, token)

    def advance(self, run_id: str, stage: Stage) -> None:
        """Enqueue the stage after ``stage`` exactly once."""
        i = PLAN.index(stage)
        if i + 1 < len(PLAN) and self.runs.once(run_id, f"advance:{stage}"):
            send_stage(self.app, run_id, PLAN[i + 1], self.settings.optimize_queue)

    def fail(self, run_id: str, exc: BaseException) -> None:
        rec = self.runs.get(run_id)
        if rec.status.terminal:
            return
        redact_error(exc)  # in place: the run record and the task's stored failure both get the masked text
        args = list(exc.args) if isinstance(exc, DspexError) else [f"{type(exc).__name__}: {exc}"]
        err_type = type(exc).__name__ if isinstance(exc, DspexError) else "DspexError"
        self.runs.update(run_id, status=RunStatus.FAILED, stage=Stage.FAILED, finished_at=time.time(),
                         error={"type": err_type, "args": args})
        record_run(rec.optimizer, "failed")
        self.emit(run_id, Stage.FAILED, message=str(args[0]) if args else err_type)

    def _cancelled(self, run_id: str, rec: RunRecord) -> bool:
        if rec.cancel_requested and not rec.status.terminal:
            self.runs.update(run_id, status=RunStatus.CANCELLED, stage=Stage.CANCELLED, finished_at=time.time())
            record_run(rec.optimizer, "cancelled")
            self.emit(run_id, Stage.CANCELLED, message="cancelled at a stage boundary; program untouched")
            return True
        return rec.status.terminal

    def _spent(self, run_id: str, sig: Any, calls: int, usage: dict[str, Any]) -> None:
        """Count what a chunk or compile spent: on the run's record and in the worker's LM metrics (the usage
        ledger has it already, billed to the session's program)."""
        from ..lm.factory import lm_name

        self.runs.add_lm_calls(run_id, calls)
        self.runs.add_usage(run_id, usage)
        record_lm(lm_name(self.runtime.lm_for(sig, recorded=True)), usage, calls=calls)

    def _check_budget(self, run_id: str, rec: RunRecord, stage: str | None = None) -> None:
        """Raise :class:`BudgetExceeded` when the run has spent its ``max_cost_usd`` or ``max_lm_calls``.

        Checked where work starts (each stage, each evaluation chunk): a run stops at the next boundary after
        its budget is spent, so it may overshoot by what one stage or chunk spends, never more.
        """
        common = parse_common(rec.params)
        where = f" before the {stage} stage" if stage else " before an evaluation chunk"
        if common.max_lm_calls is not None and rec.lm_calls >= common.max_lm_calls:
            raise BudgetExceeded(f"budget spent{where}: {rec.lm_calls} LM calls >= max_lm_calls "
                                 f"{common.max_lm_calls}; nothing promoted")
        if common.max_cost_usd is not None and rec.cost_usd >= common.max_cost_usd:
            raise BudgetExceeded(f"budget spent{where}: ${rec.cost_usd:.6f} >= max_cost_usd "
                                 f"${common.max_cost_usd:g}; nothing promoted")

    def _sig(self, rec: RunRecord) -> Any:
        return self.app.dspex_signatures.get(rec.signature)

    # -- the stage task ---------------------------------------------------------
    def run_stage(self, task: Any, run_id: str, stage: str) -> dict[str, Any]:
        try:
            step = Stage(stage)
            run = self.table[step]
        except (ValueError, KeyError):
            raise ValidationError.from_errors(wire.STAGE_TASK, [{
                "field": "stage", "message": f"unknown stage {stage!r}; expected one of {', '.join(PLAN)}"}]) from None
        rec = self.runs.get(run_id)
        if self._cancelled(run_id, rec):
            return {"stage": stage, "skipped": str(rec.status), "run_id": run_id}
        with self.lease(run_id) as held:
            if not held:  # the same run is busy elsewhere: look again shortly (it may finish or lapse)
                raise task.retry(countdown=LEASE_RETRY_S,
                                 max_retries=int(4 * self.settings.lease_ttl_s / LEASE_RETRY_S) + 100)
            if rec.status is RunStatus.QUEUED:
                self.runs.update(run_id, status=RunStatus.RUNNING, started_at=time.time())
            self.runs.update(run_id, stage=step)
            try:
                self._check_budget(run_id, self.runs.get(run_id), step)
                advance = run(task, run_id, rec)
            except Exception as exc:
                self.fail(run_id, exc)
                raise
        # Advance only once the lease is released, so the next stage never finds it held.
        if advance:
            self.advance(run_id, step)
        return self._stage_result(run_id, step)

    def _stage_result(self, run_id: str, stage: Stage) -> dict[str, Any]:
        """What a stage task returns (Flower's Result column): the stage, its score when it has one, LM calls so
        far, and the run's status; never the kwargs again."""
        rec = self.runs.get(run_id)
        score = {Stage.BASELINE: rec.baseline_score, Stage.CANDIDATE: rec.candidate_score,
                 Stage.DECIDE: rec.candidate_score}.get(stage)
        out: dict[str, Any] = {"stage": stage.value, "status": str(rec.status), "lm_calls": rec.lm_calls}
        if score is not None:
            out["score"] = score
        if stage is Stage.COMPILE and rec.trials:
            out["trials"] = len(rec.trials)
        return out

    def stage_load(self, task: Any, run_id: str, rec: RunRecord) -> bool:
        if self.runs.checkpoint(run_id, "data") is None:
            sig = self._sig(rec)
            get_metric(rec.metric)
            opt = get_optimizer(rec.optimizer)
            common = parse_common(rec.params)
            opt.parse_params(rec.params)
            given = self.runs.checkpoint(run_id, "input") or {}
            rows = given.get("trainset")
            if rows is None and rec.dataset:
                rows = DatasetStore(redis=self.runtime.redis, namespace=self.settings.namespace).get(rec.dataset)
            desc = sig.describe()
            train = validate_rows(rows, desc, what="trainset")
            val = given.get("valset")
            if val is not None:
                val = validate_rows(val, desc, what="valset")
            else:
                train, val = split(train, common.val_fraction, common.seed)
            if not train:
                raise ValidationError.from_errors("trainset", [{"field": "trainset", "message": "is empty"}])
            for what, data in (("trainset", train), ("valset", val)):
                for i, row in enumerate(data):  # the worker's own, stricter check of inputs
                    try:
                        sig.validate_inputs({k: row[k] for k in sig.input_fields if k in row})
                    except ValidationError as exc:
                        raise ValidationError.from_errors(what, [
                            {"field": f"{what}.{i}.{e['field']}", "message": e["message"]} for e in exc.errors
                        ]) from None
            try:
                current = self.runtime.store.get(rec.session, rec.program) if rec.session else None
            except ProgramNotFound:
                current = None
            self.runs.save_checkpoint(run_id, "baseline_state", {
                "version": current.version if current else 0, "state": current.state if current else None})
            self.runs.save_checkpoint(run_id, "data", {"train": train, "val": val})
        data = self.runs.checkpoint(run_id, "data")
        self.emit(run_id, Stage.LOAD, task, done=1, total=1,
                  message=f"{len(data['train'])} train, {len(data['val'])} validation examples")
        return True

    def _launch_eval(self, task: Any, run_id: str, which: Stage) -> bool:
        """Fan out a chord of chunks; its callback advances. True if the evaluation was already done."""
        if self.runs.checkpoint(run_id, f"eval:{which}") is not None:
            return True
        data = self.runs.checkpoint(run_id, "data")
        size = parse_common(self.runs.get(run_id).params).eval_chunk_size
        n = max(1, math.ceil(len(data["val"]) / size))
        self.emit(run_id, which, task, done=0, total=len(data["val"]), message=f"evaluating in {n} chunks")
        if self.runs.checkpoint(run_id, f"launched:{which}") is None:
            q = self.settings.optimize_queue
            # what runs first in the kwargs (Flower shows them as the list's args column)
            header = [self.app.signature(wire.EVAL_CHUNK_TASK, kwargs={"which": which.value, "index": i,
                                                                       "run_id": run_id}, queue=q, immutable=True)
                      for i in range(n)]
            body = self.app.signature(wire.EVAL_MERGE_TASK, kwargs={"which": which.value, "chunks": n,
                                                                    "run_id": run_id}, queue=q, immutable=True)
            body.link_error(self.app.signature(wire.FAIL_TASK, kwargs={"run_id": run_id}, queue=q))
            chord(header)(body)
            self.runs.save_checkpoint(run_id, f"launched:{which}", {"chunks": n})
        return False

    def eval_chunk(self, task: Any, run_id: str, which: str, index: int) -> dict[str, Any]:
        name = f"eval:{which}:{index}"
        done = self.runs.checkpoint(run_id, name)
        if done is not None:
            return {"index": index, "cached": True}
        rec = self.runs.get(run_id)
        if rec.status.terminal or rec.cancel_requested:  # a cancel stops the LM calls now
            return {"index": index, "skipped": str(rec.status)}
        sig = self._sig(rec)
        common = parse_common(rec.params)
        rows = self.runs.checkpoint(run_id, "data")["val"]
        chunk = rows[index * common.eval_chunk_size:(index + 1) * common.eval_chunk_size]
        state = (self.runs.checkpoint(run_id, EVALS[Stage(which)]) or {}).get("state")
        self._check_budget(run_id, rec)
        module = self._program(run_id, which, sig, state)
        scores, calls, refused, spent = self._evaluate(sig, rec.session or None, module, chunk,
                                                       get_metric(rec.metric), common.num_threads)
        self._spent(run_id, sig, calls, spent)
        self.runs.save_checkpoint(run_id, name, {"scores": scores, "auth_failed": len(refused),
                                                 "auth_error": refused[0].message if refused else None})
        return {"index": index, "n": len(scores)}

    def _program(self, run_id: str, which: str, sig: Any, state: Any) -> Any:
        """The module an evaluation of ``run_id`` scores (``which``: baseline or candidate), built once."""
        key = (run_id, which)
        with self._programs_lock:
            module = self._programs.get(key)
            if module is not None:
                self._programs.move_to_end(key)
                return module
        module = load_program(sig, state)
        with self._programs_lock:
            self._programs[key] = module
            while len(self._programs) > 8:
                self._programs.popitem(last=False)
        return module

    def _evaluate(self, sig: Any, session: str | None, module: Any, rows: list[dict[str, Any]], metric: Any,
                  threads: int) -> tuple[list[float], int, list[LMAuthError], dict[str, float]]:
        """Scores per row, LM calls made, the rows' refused-credentials errors (each scored 0 here), and what
        the rows spent (tokens, cost: the ledger's totals, summed). Calls are counted from each row's usage, not
        with a DSPy callback, which would switch DSPy's callback machinery on for every module and LM call."""
        import dspy

        refused: list[LMAuthError] = []
        spent: dict[str, float] = {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "lm_calls": 0}
        lock = threading.Lock()
        runner = self.runtime.runner

        def one(row: dict[str, Any]) -> float:
            example = dspy.Example(**row).with_inputs(*sig.input_fields)
            try:  # through the worker's one runner: the LM spend is billed to the session's program
                done = runner.run(sig, module, dict(example.inputs()), session, count_task=False)
                pred = done.prediction
                with lock:
                    for name in spent:
                        spent[name] += done.usage.get(name) or 0
            except Exception as exc:  # an example the program cannot answer scores 0, as in dspy.Evaluate
                if isinstance(exc, LMAuthError):
                    refused.append(exc)  # 0 too, unless every row was refused (eval_merge fails the run then)
                log.info("evaluation example failed: %s", exc)
                return 0.0
            # A metric that raises is a bug in the metric: it fails the run instead of scoring 0.
            return metric_score(metric(example, pred))

        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(rows)))) as pool:
            scores = list(pool.map(one, rows))
        return scores, int(spent.pop("lm_calls")), refused, spent

    def eval_merge(self, task: Any, run_id: str, which: str, chunks: int) -> dict[str, Any]:
        if self._cancelled(run_id, self.runs.get(run_id)):
            return {"which": which, "skipped": "cancelled"}
        if self.runs.checkpoint(run_id, f"eval:{which}") is None:
            scores: list[float] = []
            refused, first = 0, None
            for i in range(chunks):
                part = self.runs.checkpoint(run_id, f"eval:{which}:{i}")
                if part is None:
                    raise DspexError(f"evaluation chunk {i} of '{which}' has no result")
                scores.extend(part["scores"])
                refused += int(part.get("auth_failed") or 0)
                first = first or str(part.get("auth_error") or "") or None
            if scores and refused == len(scores):  # a refused key is not a 0.0 score: the run fails, typed
                raise LMAuthError(f"every LM call of the {which} evaluation ({len(scores)} examples) was refused "
                                  f"by the provider: {first}")
            score = sum(scores) / len(scores) if scores else 0.0
            # per example, in validation-row order: decide pairs baseline and candidate scores by position
            self.runs.save_checkpoint(run_id, f"eval:{which}", {"score": score, "n": len(scores), "scores": scores})
        result = self.runs.checkpoint(run_id, f"eval:{which}")
        rec = self.runs.get(run_id)
        best = max(s for s in (rec.best_score, result["score"]) if s is not None)
        self.runs.update(run_id, best_score=best, **{f"{which}_score": result["score"]})
        self.emit(run_id, which, task, done=result["n"], total=result["n"], score=result["score"],
                  lm_calls=self.runs.get(run_id).lm_calls)
        self.advance(run_id, Stage(which))
        return {"which": which, "score": result["score"], "n": result["n"]}  # the chord's result: no score list

    def stage_compile(self, task: Any, run_id: str, rec: RunRecord) -> bool:
        if self.runs.checkpoint(run_id, "candidate") is None:
            import dspy

            from .metrics import scoring
            from .optimizers import CompileContext, accepts_ctx, reflection_lm

            sig = self._sig(rec)
            opt = get_optimizer(rec.optimizer)
            params, common = opt.parse_params(rec.params), parse_common(rec.params)
            data = self.runs.checkpoint(run_id, "data")
            student = load_program(sig, self.runs.checkpoint(run_id, "baseline_state")["state"])
            to_ex = [dspy.Example(**r).with_inputs(*sig.input_fields) for r in data["train"]]
            val_ex = [dspy.Example(**r).with_inputs(*sig.input_fields) for r in data["val"]]
            total = opt.estimate(len(to_ex), len(val_ex), params)
            progress = _Progress(lambda stage, **k: self.emit(run_id, stage, task, **k), "compile", total)
            # a metric may return {"score", "feedback"}: only an optimizer that reads feedback gets it whole
            metric = get_metric(rec.metric) if opt.feedback else scoring(get_metric(rec.metric))
            extra: dict[str, Any] = {}
            if accepts_ctx(opt.compile):  # events, checkpoints that outlive this worker, the LM to reflect with
                extra["ctx"] = CompileContext.for_run(
                    self.runs, run_id,
                    emit=lambda **k: self.emit(run_id, Stage.COMPILE, task,
                                               **{"done": min(progress.calls, total), "total": total, **k}),
                    lm=lambda model: reflection_lm(self.settings, self.runtime.redis, sig.name, model),
                    fan_out=lambda kind, payloads, local, wait_s: self.fan_out(run_id, kind, payloads, local, wait_s,
                                                                               task))
            self.emit(run_id, Stage.COMPILE, task, done=0, total=total, message=f"running {opt.name}")
            runner, session = self.runtime.runner, rec.session or None
            # recorded: the optimizer's own threads report every LM call, billed to the session's program
            with runner.context(sig, session, callbacks=[progress.callback], recorded=True) as spent:
                compiled, trials = opt.compile(student, to_ex, val_ex, metric, params, common, **extra)
            self._spent(run_id, sig, progress.calls, runner.spend(spent, sig, session))
            self.runs.save_checkpoint(run_id, "candidate", {"state": dump_program(compiled), "trials": trials})
        cand = self.runs.checkpoint(run_id, "candidate")
        self.runs.update(run_id, trials=cand["trials"])
        self.emit(run_id, Stage.COMPILE, task, done=1, total=1, lm_calls=self.runs.get(run_id).lm_calls,
                  message=f"{len(cand['trials'])} trials" if cand["trials"] else "candidate ready")
        return True

    # -- an optimizer's own work, fanned out (work stealing) ---------------------------------------------
    def _chunk_claim(self, run_id: str, token: str, index: int, who: str) -> bool:
        key = keys.run_checkpoint(self.runs.ns, run_id, f"chunk-claim:{token}:{index}")
        return bool(self.runtime.redis.set(key, who, nx=True, ex=CHUNK_CLAIM_TTL_S))

    def _chunk_result(self, run_id: str, token: str, index: int) -> Any:
        return self.runs.checkpoint(run_id, f"chunk:{token}:{index}")

    def fan_out(self, run_id: str, kind: str, payloads: list[dict[str, Any]], local: Callable[[int], Any],
                wait_s: float, task: Any = None) -> list[Any]:
        """Send ``payloads`` as compile-chunk tasks and gather their results in order (see
        :meth:`CompileContext.fan_out`): a chunk no worker has claimed within ``wait_s`` runs here, and one whose
        claim lapsed (its worker died: the claim outlives a chunk by far) is claimed again and run here."""
        token, q = uuid.uuid4().hex[:16], self.settings.optimize_queue
        for i, payload in enumerate(payloads):
            self.app.send_task(wire.COMPILE_CHUNK_TASK, kwargs={"kind": kind, "index": i, "token": token,
                                                                "run_id": run_id, "payload": payload},
                               queue=q, shadow=f"{wire.OPTIMIZE_PREFIX}{kind}", headers=wire.sent_headers())
        results: dict[int, Any] = {}
        here = 0
        t0 = time.monotonic()
        while len(results) < len(payloads):
            for i in range(len(payloads)):
                if i in results:
                    continue
                done = self._chunk_result(run_id, token, i)
                if done is not None:
                    results[i] = done
                elif time.monotonic() - t0 >= wait_s and self._chunk_claim(run_id, token, i, "compile stage"):
                    results[i] = {"result": local(i), "by": "compile stage"}
                    self.runs.save_checkpoint(run_id, f"chunk:{token}:{i}", results[i])
                    here += 1
            if len(results) < len(payloads):
                time.sleep(CHUNK_POLL_S)
        self.emit(run_id, Stage.COMPILE, task, message=f"{kind}: {len(payloads)} chunks, "
                  f"{len(payloads) - here} on optimize workers, {here} in the compile stage",
                  chunks=len(payloads), chunks_elsewhere=len(payloads) - here)
        return [results[i]["result"] for i in range(len(payloads))]

    def compile_chunk(self, task: Any, kind: str, index: int, token: str, run_id: str,
                      payload: dict[str, Any]) -> dict[str, Any]:
        """One fanned-out chunk of a compile stage's work, run by whichever optimize worker claims it first."""
        rec = self.runs.get(run_id)
        if rec.status.terminal or rec.cancel_requested:
            return {"kind": kind, "index": index, "skipped": str(rec.status)}
        who = str(getattr(task.request, "hostname", None) or "worker")
        if not self._chunk_claim(run_id, token, index, who):
            return {"kind": kind, "index": index, "skipped": "claimed elsewhere"}
        result = chunk_handler(kind)(self, run_id, rec, payload)
        self.runs.save_checkpoint(run_id, f"chunk:{token}:{index}", {"result": result, "by": who})
        return {"kind": kind, "index": index, "by": who}

    def stage_decide(self, task: Any, run_id: str, rec: RunRecord) -> bool:
        common = parse_common(rec.params)
        baseline = self.runs.checkpoint(run_id, "eval:baseline")
        candidate = self.runs.checkpoint(run_id, "eval:candidate")
        base, cand = baseline["score"], candidate["score"]
        # Both evaluations scored the same validation rows in the same order, so the scores pair by position
        # (no "scores" in a merge from before they were kept: the interval is then not known).
        gate = decide(base, cand, baseline.get("scores"), candidate.get("scores"), min_gain=common.min_gain,
                      confidence=common.confidence, resamples=common.bootstrap_resamples, seed=common.seed)
        promote = bool(rec.session) and gate.passed
        version = self.runs.checkpoint(run_id, "baseline_state")["version"]
        if promote:
            state = self.runs.checkpoint(run_id, "candidate")["state"]
            # The run id makes this write idempotent: a redelivered decide adds no second version.
            version = self.runtime.store.put(rec.session, rec.program, state, signature=rec.signature,
                                             token=f"run-{run_id}")
        if rec.session:
            reason = gate.reason
        else:
            reason = (f"dry run (no session): candidate {cand:.4f} vs baseline {base:.4f}, not promoted; "
                      "save it with client.programs.put(session, program, run.candidate())")
        rec = self.runs.get(run_id)
        summary = {
            "run_id": run_id, "baseline_score": base, "score": cand, "promoted": promote,
            "program_version": version, "optimizer": rec.optimizer, "lm_calls": rec.lm_calls,
            "usage": {"lm_calls": rec.lm_calls, "prompt_tokens": rec.prompt_tokens,
                      "completion_tokens": rec.completion_tokens, "cost_usd": round(rec.cost_usd, 8)},
            "reason": reason, "trials": rec.trials or [], "dry_run": not rec.session,
            "duration_s": round(time.time() - float(rec.started_at or rec.created_at), 3), **gate.summary(),
        }
        self.runs.update(run_id, status=RunStatus.SUCCEEDED, stage=Stage.DONE, finished_at=time.time(),
                         summary=summary)
        record_run(rec.optimizer, "succeeded", promoted=rec.signature if promote else None)
        self.emit(run_id, Stage.DONE, task, done=1, total=1, score=cand, lm_calls=rec.lm_calls, message=reason,
                  promoted=promote, program_version=version)
        return False


def register_optimize_tasks(app: Any) -> None:
    """Register the stage tasks on a worker app (they route to ``dspex.optimize``)."""
    stages = Stages(app)
    q = app.dspex_settings.optimize_queue
    common = {"bind": True, "shared": False, "typing": False, "acks_late": True, "reject_on_worker_lost": True,
              "queue": q, "throws": (ValidationError, BudgetExceeded)}

    @app.task(name=wire.STAGE_TASK, **common)  # type: ignore[untyped-decorator]
    def stage(self: Any, run_id: str, stage: str) -> dict[str, Any]:
        return stages.run_stage(self, run_id, stage)

    @app.task(name=wire.EVAL_CHUNK_TASK, **common)  # type: ignore[untyped-decorator]
    def eval_chunk(self: Any, run_id: str, which: str, index: int) -> dict[str, Any]:
        try:
            return stages.eval_chunk(self, run_id, which, index)
        except Exception as exc:
            stages.fail(run_id, exc)
            raise

    @app.task(name=wire.EVAL_MERGE_TASK, **common)  # type: ignore[untyped-decorator]
    def eval_merge(self: Any, run_id: str, which: str, chunks: int) -> dict[str, Any]:
        try:
            return stages.eval_merge(self, run_id, which, chunks)
        except Exception as exc:
            stages.fail(run_id, exc)
            raise

    @app.task(name=wire.COMPILE_CHUNK_TASK, **common)  # type: ignore[untyped-decorator]
    def compile_chunk(self: Any, kind: str, index: int, token: str, run_id: str,
                      payload: dict[str, Any]) -> dict[str, Any]:
        return stages.compile_chunk(self, kind, index, token, run_id, payload)

    @app.task(name=wire.FAIL_TASK, **common)  # type: ignore[untyped-decorator]
    def fail(self: Any, *args: Any, run_id: str, **kwargs: Any) -> None:
        exc = next((a for a in args if isinstance(a, BaseException)), None)
        stages.fail(run_id, exc or DspexError("an evaluation chunk failed"))
