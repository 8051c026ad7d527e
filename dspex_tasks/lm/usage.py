"""LM usage and cost accounting: per task in the result, aggregated per session, signature and model in Redis.

Each task's tokens come from the calls :class:`~dspex_tasks.lm.governed.GovernedLM` records in the
task's :func:`task_usage` scope (so a fallback is billed to the model that answered), else from DSPy's
usage tracker. Cost comes from LiteLLM's bundled price table (what ``litellm.cost_per_token`` reads
offline: prompt and completion tokens times the model's per-token prices); a model it does not know
costs 0 and says ``cost_known: false``. Cache hits bill nothing and are counted as ``cache_hits``.

Aggregates are summed in process and written every second by a daemon thread (and on
:meth:`UsageLedger.close`), one pipeline of HINCRBY/HINCRBYFLOAT, so a task costs no Redis round
trip: fields ``<signature>|<model>|<metric>`` in :func:`keys.usage` (fleet) and
:func:`keys.session_usage` (per session), and the same per UTC hour in :func:`keys.usage_hour` and
:func:`keys.session_usage_hour` (kept ``DSPEX_USAGE_HISTORY_DAYS``), which :func:`usage_series` reads for charts
over time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from .. import keys

__all__ = ["TaskUsage", "task_usage", "record_call", "price", "prime", "UsageLedger", "usage_report", "usage_totals",
           "usage_series", "sum_rows", "METRICS"]

log = logging.getLogger(__name__)

# Integer metrics (HINCRBY) and the one float (HINCRBYFLOAT).
METRICS = ("tasks", "lm_calls", "cache_hits", "prompt_tokens", "completion_tokens", "total_tokens",
           "unpriced_calls")
COST = "cost_usd"
_SEP = "|"


@dataclass
class TaskUsage:
    """What one task's LM calls used; filled by GovernedLM through :func:`record_call`."""

    signature: str
    session: str | None
    calls: list[tuple[str, dict[str, Any], bool]] = field(default_factory=list)  # (model, usage, cached)
    default_lm: str = ""  # the name of the LM the scope runs with (the result's ``lm`` when no call named one)

    @property
    def served(self) -> str | None:
        """The model that answered the task's last LM call (a cache hit names the model that answered it)."""
        return self.calls[-1][0] if self.calls else None


_current: ContextVar[TaskUsage | None] = ContextVar("dspex_task_usage", default=None)


@contextlib.contextmanager
def task_usage(signature: str, session: str | None) -> Iterator[TaskUsage]:
    """Collect the LM calls made in this context (one task) into a :class:`TaskUsage`."""
    scope = TaskUsage(signature, session)
    token = _current.set(scope)
    try:
        yield scope
    finally:
        _current.reset(token)


#: The key under which a scope also travels in ``dspy.context``: DSPy copies its context into the threads of
#: ``dspy.Parallel`` and the optimizers (a ContextVar does not reach them), so calls made there are counted too.
DSPY_KEY = "dspex_usage"


def current_scope() -> TaskUsage | None:
    """The scope of the running task: this context's, else the one DSPy carried into this thread."""
    scope = _current.get()
    if scope is None:
        dspy = sys.modules.get("dspy")  # never imported from here: no dspy, no DSPy threads to look into
        found = dspy.settings.get(DSPY_KEY) if dspy is not None else None
        scope = found if isinstance(found, TaskUsage) else None
    return scope


def record_call(model: str, usage: Mapping[str, Any] | None, cached: bool = False) -> None:
    """Record one LM call in the current task's scope (a no-op outside a task)."""
    scope = current_scope()
    if scope is not None:
        scope.calls.append((model, dict(usage or {}), cached))


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@functools.lru_cache(maxsize=1)
def _price_table() -> dict[str, Any]:
    """LiteLLM's bundled price table (the one ``litellm.cost_per_token`` reads with
    ``LITELLM_LOCAL_MODEL_COST_MAP=True``), read as JSON: ~0.1 s, where importing LiteLLM itself costs
    seconds of CPU per process (measured: 3.8 s on a loaded host, stalling every thread of a worker
    that did it on its first task)."""
    try:
        spec = importlib.util.find_spec("litellm")  # locates the package without importing it
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            path = os.path.join(folder, "model_prices_and_context_window_backup.json")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    table = json.load(f)
                return table if isinstance(table, dict) else {}
    except (ImportError, OSError, ValueError) as exc:
        log.warning("LiteLLM's price table is unavailable (%s); LM costs are reported as unknown", exc)
    return {}


@functools.lru_cache(maxsize=256)
def _prices(model: str) -> tuple[float, float] | None:
    """(USD per prompt token, per completion token) for ``model``, as LiteLLM prices it; None if unknown.

    ``provider/name`` is looked up as written, then as ``name`` when the table lists it for that
    provider (``openai/gpt-4o-mini`` -> ``gpt-4o-mini``). The in-process mock is never looked up."""
    if model == "mock" or model.startswith("mock/"):
        return None
    table = _price_table()
    provider, _, name = model.partition("/")
    for key, want in ((model, None), (name, provider)):
        entry = table.get(key) if key else None
        if not isinstance(entry, dict) or (want is not None and entry.get("litellm_provider") != want):
            continue
        inp, out = entry.get("input_cost_per_token"), entry.get("output_cost_per_token")
        if isinstance(inp, int | float) and isinstance(out, int | float):
            return float(inp), float(out)
    return None


def prime(model: str) -> bool:
    """Load the price table and look ``model`` up now (at worker warm-up, not on a task)."""
    return _prices(model) is not None


def price(model: str, prompt_tokens: int, completion_tokens: int) -> tuple[float, bool]:
    """Estimated USD for the tokens, and whether the model is in the price table (else 0.0, False)."""
    prices = _prices(model)
    if prices is None:
        return 0.0, False
    return prompt_tokens * prices[0] + completion_tokens * prices[1], True


def _per_model(scope: TaskUsage | None, prediction: Any) -> dict[str, dict[str, int]]:
    """Per model: calls, cache hits, prompt and completion tokens."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(("lm_calls", "cache_hits", "prompt_tokens",
                                                                         "completion_tokens"), 0))
    if scope is not None and scope.calls:
        for model, usage, cached in scope.calls:
            row = out[model]
            row["lm_calls"] += 1
            row["cache_hits"] += int(cached)
            row["prompt_tokens"] += _int(usage.get("prompt_tokens"))
            row["completion_tokens"] += _int(usage.get("completion_tokens"))
        return dict(out)
    try:
        tracked = prediction.get_lm_usage() or {}
    except AttributeError:
        tracked = {}
    for model, usage in tracked.items():
        if isinstance(usage, Mapping):
            row = out[str(model)]
            row["lm_calls"] += 1  # DSPy merges a model's calls; at least one was made
            row["prompt_tokens"] += _int(usage.get("prompt_tokens"))
            row["completion_tokens"] += _int(usage.get("completion_tokens"))
    return dict(out)


class UsageLedger:
    """Per-process usage aggregation, flushed to Redis in the background.

    Args:
        redis: A ``redis.Redis`` client (None: aggregate nothing, still report per task).
        namespace: The key namespace.
        flush_s: Flush interval of the background thread.
        session_ttl_s: Expire a session's usage hash with its programs.
        history_s: Keep the per-hour hashes this long (``DSPEX_USAGE_HISTORY_DAYS``).
    """

    def __init__(self, redis: Any, namespace: str, *, flush_s: float = 1.0, session_ttl_s: int | None = None,
                 history_s: int = 30 * 86_400) -> None:
        self.redis = redis
        self.namespace = namespace
        self.flush_s = flush_s
        self.session_ttl_s = session_ttl_s
        self.history_s = history_s
        self._lock = threading.Lock()
        self._pending: dict[tuple[str | None, str, str, str], float] = defaultdict(float)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def finish(self, scope: TaskUsage | None, prediction: Any, signature: str, session: str | None, *,
               count_task: bool = True) -> dict[str, Any]:
        """The task's usage for its result (tokens, cost, calls), added to the aggregates.

        ``count_task=False`` adds the spend without counting a task (an optimization stage's LM calls).
        """
        rows = _per_model(scope, prediction)
        total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cost_usd": 0.0, "cost_known": True,
                 "lm_calls": 0, "cache_hits": 0}
        deltas: list[tuple[str, str, float]] = []
        for model, row in rows.items():
            billed = row["lm_calls"] - row["cache_hits"]
            cost, known = price(model, row["prompt_tokens"], row["completion_tokens"]) if billed else (0.0, True)
            for name in ("prompt_tokens", "completion_tokens", "lm_calls", "cache_hits"):
                total[name] += row[name]
            total["cost_usd"] += cost
            total["cost_known"] = bool(total["cost_known"]) and known
            tokens = row["prompt_tokens"] + row["completion_tokens"]
            deltas += [(model, "lm_calls", row["lm_calls"]), (model, "cache_hits", row["cache_hits"]),
                       (model, "prompt_tokens", row["prompt_tokens"]),
                       (model, "completion_tokens", row["completion_tokens"]), (model, "total_tokens", tokens),
                       (model, COST, cost), (model, "unpriced_calls", 0 if known else billed)]
        if rows and count_task:  # the task counts once, for the model that answered it last
            deltas.append((scope.served if scope is not None and scope.served else next(iter(rows)), "tasks", 1))
        total["total_tokens"] = int(total["prompt_tokens"]) + int(total["completion_tokens"])
        total["cost_usd"] = round(float(total["cost_usd"]), 8)
        if self.redis is not None and deltas:
            self._add(signature, session, deltas)
        return total

    def _add(self, signature: str, session: str | None, deltas: list[tuple[str, str, float]]) -> None:
        with self._lock:
            for model, metric, value in deltas:
                if value:
                    self._pending[(session, signature, model, metric)] += value
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="dspex-usage-flush", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
            except Exception as exc:  # Redis away: keep the counts, try again
                log.warning("could not write LM usage: %s", exc)

    def flush(self) -> None:
        """Write the pending aggregates (one pipeline); on failure they are kept for the next flush."""
        with self._lock:
            pending, self._pending = self._pending, defaultdict(float)
        if not pending or self.redis is None:
            return
        ns, hour = self.namespace, int(time.time()) // 3600  # the hour of the flush (pending is <= flush_s old)
        try:
            pipe = self.redis.pipeline(transaction=False)
            sessions = set()
            for (session, signature, model, metric), value in pending.items():
                fld = _SEP.join((signature, model, metric))
                targets = [keys.usage(ns), keys.usage_hour(ns, hour)]
                if session is not None:
                    targets += [keys.session_usage(ns, session), keys.session_usage_hour(ns, session, hour)]
                    sessions.add(session)
                for key in targets:
                    if metric == COST:
                        pipe.hincrbyfloat(key, fld, value)
                    else:
                        pipe.hincrby(key, fld, int(value))
            pipe.expire(keys.usage_hour(ns, hour), self.history_s)
            for session in sessions:
                pipe.expire(keys.session_usage_hour(ns, session, hour), self.history_s)
                if self.session_ttl_s:
                    pipe.expire(keys.session_usage(ns, session), self.session_ttl_s)
            pipe.execute()
        except Exception:
            with self._lock:
                for k, v in pending.items():
                    self._pending[k] += v
            raise

    def close(self) -> None:
        """Stop the flusher and write what is pending."""
        self._stop.set()
        try:
            self.flush()
        except Exception as exc:
            log.warning("could not write LM usage at shutdown: %s", exc)


# -- the read side: CLI and metrics ---------------------------------------------------------
def usage_report(redis: Any, namespace: str, session: str | None = None) -> list[dict[str, Any]]:
    """Rows ``{signature, model, tasks, lm_calls, cache_hits, *_tokens, cost_usd, cost_known}``, sorted."""
    key = keys.session_usage(namespace, session) if session is not None else keys.usage(namespace)
    return _rows(redis.hgetall(key))


def usage_series(redis: Any, namespace: str, session: str | None = None, *, hours: int = 24,
                 now: float | None = None) -> list[dict[str, Any]]:
    """The last ``hours`` UTC hours, oldest first, each ``{hour: its start in unix seconds, rows: [as
    usage_report]}`` (an hour without usage has no rows); one pipelined read."""
    last = int(time.time() if now is None else now) // 3600
    span = range(last - max(1, hours) + 1, last + 1)
    pipe = redis.pipeline(transaction=False)
    for hour in span:
        pipe.hgetall(keys.session_usage_hour(namespace, session, hour) if session is not None
                     else keys.usage_hour(namespace, hour))
    return [{"hour": hour * 3600, "rows": _rows(raw)} for hour, raw in zip(span, pipe.execute(), strict=True)]


def _rows(raw_hash: Mapping[Any, Any] | None) -> list[dict[str, Any]]:
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for raw_field, raw_value in (raw_hash or {}).items():
        text = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
        signature, _, rest = text.partition(_SEP)
        model, _, metric = rest.rpartition(_SEP)
        if not model or not metric:
            continue
        row = rows.setdefault((signature, model), {"signature": signature, "model": model, **dict.fromkeys(METRICS, 0),
                                                   COST: 0.0})
        value = raw_value.decode() if isinstance(raw_value, bytes) else str(raw_value)
        row[metric] = float(value) if metric == COST else int(float(value))
    out = []
    for sig_model in sorted(rows):
        row = rows[sig_model]
        row[COST] = round(float(row[COST]), 8)
        row["cost_known"] = row["unpriced_calls"] == 0
        out.append(row)
    return out


def sum_rows(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Every metric of ``rows`` (as :func:`usage_report` gives them) summed, the cost rounded, and ``cost_known``."""
    totals: dict[str, Any] = {**dict.fromkeys(METRICS, 0), COST: 0.0}
    for row in rows:
        for name in (*METRICS, COST):
            totals[name] += row[name]
    totals[COST] = round(float(totals[COST]), 8)
    totals["cost_known"] = totals["unpriced_calls"] == 0
    return totals


def usage_totals(redis: Any, namespace: str, session: str | None = None) -> dict[str, Any]:
    """Fleet (or one session's) totals for metrics: every metric summed over signatures and models."""
    return sum_rows(usage_report(redis, namespace, session))
