"""The governed LM: shared cache, fleet-wide rate limits, retries, fallbacks and usage around DSPy's LMs.

:class:`GovernedLM` is a ``dspy.BaseLM`` (DSPy 3.4's legacy ``forward()`` interface, run through
``LegacyEngine``: DSPy adds no retries or cache of its own) wrapping one ``dspy.LM`` per model of
its route, each built with ``num_retries=0``. One ``forward()``:

1. looks the request up in the shared Redis cache (:mod:`~dspex_tasks.lm.cache`), when enabled;
2. picks the model order: the route, or for a weighted route (``lm={"m1": 0.9, "m2": 0.1}``) the
   model chosen deterministically by the request hash first, the others after it;
3. per model and attempt, reserves a slot in the fleet-wide buckets (:mod:`~dspex_tasks.lm.ratelimit`)
   and calls the provider, under the error policy below;
4. stores the answer in the cache and records the call (model, usage) in the task's usage scope
   (:mod:`~dspex_tasks.lm.usage`), which is also how the result's ``lm`` names the model that answered.

Error policy (data: the class table of :mod:`.errors`):

- rate limited (429), server errors (5xx), transport failures: retried on the same model up to
  ``DSPEX_LM_NUM_RETRIES`` times, after ``Retry-After`` when the provider gives one, else after an
  exponential backoff from ``DSPEX_LM_RETRY_BACKOFF_S``; then the next model of the route serves.
  A ``Retry-After`` longer than ``DSPEX_RATE_LIMIT_MAX_WAIT_S`` moves on at once (the task re-queues
  with that countdown when no model is left). Exhausted: the retryable class of the last provider
  error (``errors.LMRateLimitError``, ``LMServerError``, ``LMConnectionError``, carrying its
  ``retry_after``), which the task retries (``DSPEX_TASK_MAX_RETRIES``).
- timeout (``DSPEX_LM_TIMEOUT_S``): never retried on the same model (the next model may serve);
  ``errors.LMTimeout``, not retried by the task.
- context window exceeded: ``errors.LMContextLengthExceeded`` at once (no retry, no fallback).
- anything else (auth, invalid request): ``errors.LMError`` at once, not retried (a refused key: ``errors.LMAuthError``).

Thread-safe: no per-call state lives on the object (Redis clients pool their connections).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dspy

from ..errors import ConfigurationError, DspexError, LMContextLengthExceeded, LMTimeout, RateLimited
from .cache import IGNORED_PARAMS, LMCache, entry_from_response, request_digest
from .errors import classify, retry_after_of, to_lm_error
from .factory import build_lm, lm_name, native_async
from .gate import pass_gate
from .limits import BACKOFF_JITTER, Limit, estimate_tokens, parse_limits
from .limits import backoff_s as backoff
from .ratelimit import RateLimiter
from .response import as_response
from .usage import prime, record_call

__all__ = ["GovernedLM", "Route", "LMPlan", "plan_lm", "build_signature_lm", "parse_route", "retry_delay"]

log = logging.getLogger(__name__)

_ENDPOINT_KEYS = frozenset({"api_base", "api_key_env", "timeout", "max_tokens"})
_MISSING = object()


def retry_delay(exc: BaseException, attempt: int, backoff_s: float, rng: random.Random | None = None) -> float:
    """Seconds before retry number ``attempt + 1``: the provider's ``Retry-After`` when given, else
    ``backoff_s * 2**attempt`` with +-20% jitter, at most :data:`~dspex_tasks.lm.limits.MAX_BACKOFF_S`."""
    hint = retry_after_of(exc)
    if hint is not None and math.isfinite(hint):
        return hint
    return backoff(backoff_s, attempt) * (rng or random).uniform(*BACKOFF_JITTER)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).replace("\n", " ").strip()
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class Route:
    """The models a signature may use, in fallback order, with optional A/B weights."""

    models: tuple[str, ...]
    weights: tuple[float, ...] | None = None

    @property
    def key(self) -> str:
        if self.weights is None:
            return ",".join(self.models)
        return ",".join(f"{m}={w:g}" for m, w in zip(self.models, self.weights, strict=True))

    def order(self, digest: str | None) -> tuple[str, ...]:
        """The model order for a request: weighted routes put the hash-chosen model first."""
        if self.weights is None or digest is None:
            return self.models
        point = int(digest[:13], 16) / float(16 ** 13) * sum(self.weights)
        chosen = self.models[-1]
        for model, weight in zip(self.models, self.weights, strict=True):
            if point < weight:
                chosen = model
                break
            point -= weight
        return (chosen, *(m for m in self.models if m != chosen))


def parse_route(spec: Any, fallbacks: Sequence[str] = ()) -> Route:
    """A route from ``lm=`` (a model, a list in fallback order, or ``{model: weight}``).

    ``fallbacks`` (``DSPEX_LM_FALLBACKS``) follow a single model.

    Raises:
        ConfigurationError: for anything else.
    """
    if isinstance(spec, str) and spec.strip():
        models = [spec.strip(), *(f for f in fallbacks if f != spec.strip())]
        return Route(tuple(dict.fromkeys(models)))
    if isinstance(spec, list | tuple) and spec and all(isinstance(m, str) and m.strip() for m in spec):
        return Route(tuple(dict.fromkeys(m.strip() for m in spec)))
    if isinstance(spec, Mapping) and spec:
        weights = []
        for model, weight in spec.items():
            if not isinstance(model, str) or isinstance(weight, bool) or not isinstance(weight, int | float) \
                    or not weight > 0:
                raise ConfigurationError(f"lm weights must map model names to numbers > 0, got {model!r}: {weight!r}")
            weights.append(float(weight))
        return Route(tuple(spec), tuple(weights))
    raise ConfigurationError(f"lm must be a model name, a list of them or {{model: weight}}, got {spec!r}")




def _usage_of(raw: Any) -> dict[str, Any]:
    usage = raw.get("usage") if isinstance(raw, Mapping) else getattr(raw, "usage", None)
    try:
        return dict(usage or {})
    except (TypeError, ValueError):
        return {}


@dataclass
class _Exhausted(Exception):
    """One model of the route gave up (internal)."""

    model: str
    error: BaseException
    attempts: int
    timeout: bool = False
    countdown: float | None = None


class GovernedLM(dspy.BaseLM):  # type: ignore[misc]
    """A ``dspy.BaseLM`` that governs calls to the models of a route (see the module docstring).

    Args:
        route: Models in fallback order (with weights for A/B routing).
        inners: One LM per model of the route (``dspy.LM`` with ``num_retries=0``, or a MockLM).
        limits: Rate-limit buckets per model (the model's and the signature's).
        limiter: Required when any model has limits.
        shared_cache: The shared cache, or None.
        retries: Retries on the same model for a retryable error.
        backoff_s: First retry delay without ``Retry-After``.
        max_wait_s: The longest ``Retry-After`` slept in-thread.
        sleep: Injected for tests.
    """

    def __init__(self, route: Route, inners: Mapping[str, Any], *, limits: Mapping[str, Sequence[Limit]] | None = None,
                 limiter: RateLimiter | None = None, shared_cache: LMCache | None = None, retries: int = 2,
                 backoff_s: float = 0.5, max_wait_s: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> None:
        primary = inners[route.models[0]]
        super().__init__(model=lm_name(primary), model_type=getattr(primary, "model_type", "chat"), cache=False,
                         num_retries=0)
        self.route = route
        self.inners = dict(inners)
        self.limits = {m: tuple(v) for m, v in (limits or {}).items() if v}
        self.limiter = limiter
        self.shared_cache = shared_cache
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_wait_s = max_wait_s
        self.sleep = sleep
        self.kwargs = {k: v for k, v in dict(getattr(primary, "kwargs", {}) or {}).items() if k not in IGNORED_PARAMS}
        self._base_kwargs = dict(self.kwargs)
        if self.limits and limiter is None:
            raise ConfigurationError("rate limits need a RateLimiter (Redis)")

    @property
    def supports_function_calling(self) -> bool:
        return bool(getattr(self.inners[self.route.models[0]], "supports_function_calling", False))

    @property
    def supports_reasoning(self) -> bool:
        return bool(getattr(self.inners[self.route.models[0]], "supports_reasoning", False))

    @property
    def supports_response_schema(self) -> bool:
        return bool(getattr(self.inners[self.route.models[0]], "supports_response_schema", False))

    @property
    def supported_params(self) -> set[str]:
        return set(getattr(self.inners[self.route.models[0]], "supported_params", set()))

    def _params(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        # Settings changed on a copy (lm.copy(rollout_id=1)) travel with every call.
        changed = {k: v for k, v in self.kwargs.items() if self._base_kwargs.get(k, _MISSING) != v}
        return {**changed, **kwargs}

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        """One governed request; returns an OpenAI-shaped response.

        Raises:
            RateLimited: a fleet limit (or the provider) needs a wait longer than a thread should hold.
            LMError: ``LMTimeout``, ``LMContextLengthExceeded``, or the last provider error.
        """
        pass_gate()  # a cancelled or timed-out job stops here (lm.gate)
        params, digest = self._prepare(prompt, messages, kwargs)
        if self.shared_cache is not None and digest is not None:
            hit = self._cached(self._cache_get(digest))
            if hit is not None:
                return hit
        failures: list[_Exhausted] = []
        for model in self.route.order(digest):
            try:
                raw = self._call(model, prompt, messages, params)
            except _Exhausted as exhausted:
                failures.append(exhausted)
                continue
            return self._served(model, raw, digest)
        raise self._final_error(failures)

    async def aforward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        """:meth:`forward` as a coroutine: the provider call is the inner LM's own ``aforward`` (DSPy's async
        engine, its connections bound to the running loop); the cache and the rate-limit buckets, Redis round
        trips, run in a thread only when configured. Inner LMs without ``aforward`` run in a thread."""
        pass_gate()
        params, digest = self._prepare(prompt, messages, kwargs)
        if self.shared_cache is not None and digest is not None:
            hit = self._cached(await asyncio.to_thread(self._cache_get, digest))
            if hit is not None:
                return hit
        failures: list[_Exhausted] = []
        for model in self.route.order(digest):
            try:
                raw = await self._acall(model, prompt, messages, params)
            except _Exhausted as exhausted:
                failures.append(exhausted)
                continue
            if self.shared_cache is not None and digest is not None:
                await asyncio.to_thread(self._cache_put, digest, raw, lm_name(self.inners[model]))
            return self._served(model, raw, None)
        raise self._final_error(failures)

    def _prepare(self, prompt: Any, messages: Any, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
        params = self._params(kwargs)
        digest = None
        if self.shared_cache is not None or self.route.weights is not None:
            shaping = {**self._base_kwargs, **params}
            digest = request_digest(self.route.key, prompt, messages, shaping)
        return params, digest

    def _cached(self, hit: dict[str, Any] | None) -> Any:
        if hit is None:
            return None
        record_call(str(hit.get("model") or self.model), {}, cached=True)
        return as_response({"model": hit.get("model") or self.model, "choices": hit["choices"], "usage": {},
                            "cache_hit": True})

    def _served(self, model: str, raw: Any, digest: str | None) -> Any:
        served = lm_name(self.inners[model])
        record_call(served, _usage_of(raw))
        if self.shared_cache is not None and digest is not None:
            self._cache_put(digest, raw, served)
        return raw

    def _tokens(self, limits: Sequence[Limit], prompt: Any, messages: Any, params: Mapping[str, Any]) -> int:
        if any(lim.unit == "tokens" for lim in limits):
            return estimate_tokens(prompt, messages, params.get("max_tokens", self._base_kwargs.get("max_tokens")))
        return 0

    def _call(self, model: str, prompt: Any, messages: Any, params: dict[str, Any]) -> Any:
        inner = self.inners[model]
        limits = self.limits.get(model, ())
        tokens = self._tokens(limits, prompt, messages, params)
        attempt = 0
        while True:
            attempt += 1
            if limits and self.limiter is not None:
                self.limiter.acquire(limits, tokens=tokens, what=model)
            try:
                raw = inner.forward(prompt=prompt, messages=messages, **params)
            except (DspexError, RateLimited):
                raise
            except Exception as exc:
                self.sleep(self._failed(model, exc, attempt))
                continue
            self._settled(limits, tokens, raw)
            return raw

    async def _acall(self, model: str, prompt: Any, messages: Any, params: dict[str, Any]) -> Any:
        inner = self.inners[model]
        limits = self.limits.get(model, ())
        tokens = self._tokens(limits, prompt, messages, params)
        native = native_async(inner)
        attempt = 0
        while True:
            attempt += 1
            if limits and self.limiter is not None:
                # the reservation is a Redis round trip (in a thread); the wait for the slot is on the loop
                wait = await asyncio.to_thread(self.limiter.acquire, limits, tokens=tokens, what=model, sleep=False)
                if wait > 0:
                    await asyncio.sleep(wait)
            try:
                if native:
                    raw = await inner.aforward(prompt=prompt, messages=messages, **params)
                else:
                    raw = await asyncio.to_thread(inner.forward, prompt=prompt, messages=messages, **params)
            except (DspexError, RateLimited):
                raise
            except Exception as exc:
                await asyncio.sleep(self._failed(model, exc, attempt))
                continue
            if tokens and self.limiter is not None:
                await asyncio.to_thread(self._settled, limits, tokens, raw)
            return raw

    def _failed(self, model: str, exc: Exception, attempt: int) -> float:
        """After a failed attempt: the delay before the next one on ``model``, or raise (typed, or
        :class:`_Exhausted` to move on to the route's next model)."""
        kind = classify(exc)
        if kind == "context":
            raise LMContextLengthExceeded(f"prompt exceeds the context window of '{model}': {_short(exc)}") from None
        if kind == "fatal":
            # typed by class (a refused key is LMAuthError); the message is redacted there
            raise to_lm_error(exc, f"LM call to '{model}' failed ({type(exc).__name__}): {_short(exc)}") from None
        if kind == "timeout":
            raise _Exhausted(model, exc, attempt, timeout=True) from None
        if attempt > self.retries:
            raise _Exhausted(model, exc, attempt) from None
        delay = retry_delay(exc, attempt - 1, self.backoff_s)
        if delay > self.max_wait_s and getattr(exc, "retry_after", None) is not None:
            raise _Exhausted(model, exc, attempt, countdown=delay) from None
        return delay

    def _settled(self, limits: Sequence[Limit], tokens: int, raw: Any) -> None:
        if tokens and self.limiter is not None:
            actual = _usage_of(raw).get("total_tokens")
            if isinstance(actual, int):
                self._settle(limits, tokens, actual)

    def _final_error(self, failures: list[_Exhausted]) -> DspexError:
        last = failures[-1]
        attempts = sum(f.attempts for f in failures)
        models = ", ".join(f"'{f.model}'" for f in failures)
        if last.countdown is not None:
            return RateLimited(last.countdown, f"provider rate limit on {models}: retry after {last.countdown:.1f}s",
                               True)
        if last.timeout:
            return LMTimeout(f"LM call to {models} timed out (DSPEX_LM_TIMEOUT_S) after {attempts} attempt(s): "
                             f"{_short(last.error)}")
        # Typed by the last provider error: a rate limit, a server error or a transport failure stays
        # retryable (the task tries again), carrying the provider's Retry-After when it gave one.
        return to_lm_error(last.error, f"LM call failed ({type(last.error).__name__}) on {models} after {attempts} "
                                       f"attempts: {_short(last.error)}")

    def _cache_get(self, digest: str) -> dict[str, Any] | None:
        assert self.shared_cache is not None
        try:
            return self.shared_cache.get(digest)
        except Exception as exc:  # a cache that cannot answer is a miss, not a failed task
            log.warning("LM cache lookup failed: %s", exc)
            return None

    def _cache_put(self, digest: str, raw: Any, served: str) -> None:
        assert self.shared_cache is not None
        entry = entry_from_response(raw, served)
        if entry is None:
            return
        try:
            self.shared_cache.put(digest, entry)
        except Exception as exc:
            log.warning("LM cache store failed: %s", exc)

    def _settle(self, limits: Sequence[Limit], estimated: int, actual: int) -> None:
        assert self.limiter is not None
        try:
            self.limiter.settle(limits, estimated=estimated, actual=actual)
        except Exception as exc:
            log.warning("could not settle token bucket: %s", exc)

    def dump_state(self) -> dict[str, Any]:
        """The primary model's state: a program saved with this LM reloads with a plain LM for it."""
        primary = self.inners[self.route.models[0]]
        dump = getattr(primary, "dump_state", None)
        return dict(dump()) if callable(dump) else {"model": self.model}

    def __repr__(self) -> str:
        return f"GovernedLM(route={self.route.key!r}, cache={self.shared_cache is not None}, limits={dict(self.limits)!r})"


# -- from settings and signature options -------------------------------------------------------
@dataclass(frozen=True)
class LMPlan:
    """What a signature's LM needs; ``key`` names the worker's pool of equal LMs."""

    route: Route
    cache: bool
    limits: Mapping[str, tuple[Limit, ...]]
    governed: bool
    key: str

    @property
    def in_process(self) -> bool:
        return self.route.models == ("mock",)


def plan_lm(settings: Any, name: str, options: Mapping[str, Any]) -> LMPlan:
    """Decide a signature's LM from settings and its options (``lm``, ``cache``, ``rate_limit``).

    Real models are always governed (error policy, fallbacks, served model); the in-process mock
    only when a cache or limit applies. Redis is used only for a configured cache or limit.

    Raises:
        ConfigurationError: a bad route, rate limit or endpoint.
    """
    fallbacks = [m.strip() for m in (settings.lm_fallbacks or "").split(",") if m.strip()]
    route = parse_route(options.get("lm") or settings.lm, fallbacks)
    for model, endpoint in settings.lm_endpoints.items():
        bad = sorted(set(endpoint) - _ENDPOINT_KEYS) if isinstance(endpoint, Mapping) else ["<not an object>"]
        if bad:
            raise ConfigurationError(f"DSPEX_LM_ENDPOINTS[{model!r}]: unknown key(s) {bad}; expected "
                                     f"{sorted(_ENDPOINT_KEYS)} (keys go in the variable named by api_key_env)")
    cache = bool(options.get("cache", settings.lm_shared_cache))
    try:
        own = tuple(parse_limits(options["rate_limit"], f"sig:{name}")) if options.get("rate_limit") else ()
        limits = {m: tuple(parse_limits(settings.rate_limits.get(m) or {}, f"model:{m}")) + own
                  for m in route.models}
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    limits = {m: lims for m, lims in limits.items() if lims}
    governed = bool(cache or limits or len(route.models) > 1 or route.models != ("mock",))
    if not governed:
        key = route.key
    elif not cache and not own:
        key = f"governed:{route.key}"
    else:
        key = f"governed:{route.key}|sig={name}|cache={int(cache)}"
    return LMPlan(route, cache, limits, governed, key)


def build_signature_lm(settings: Any, plan: LMPlan, redis: Any) -> Any:
    """Build the LM a plan describes (a plain LM when it needs no governing); its models' prices are
    looked up now, at warm-up, rather than on the first task."""
    if not plan.governed:
        plain = build_lm(settings, plan.route.models[0])
        prime(lm_name(plain))
        return plain
    if (plan.cache or plan.limits) and redis is None:
        raise ConfigurationError("LM rate limits and the shared LM cache need Redis")
    inners = {m: build_lm(settings, m, num_retries=0) for m in plan.route.models}
    for inner in inners.values():
        prime(lm_name(inner))
    limiter = RateLimiter(redis, settings.namespace, max_wait_s=settings.rate_limit_max_wait_s,
                          max_queue_s=settings.rate_limit_max_queue_s) if plan.limits else None
    cache = LMCache(redis, settings.namespace, ttl_s=settings.lm_cache_ttl_s,
                    max_entries=settings.lm_cache_max_entries) if plan.cache else None
    return GovernedLM(plan.route, inners, limits=plan.limits, limiter=limiter, shared_cache=cache,
                      retries=settings.lm_num_retries, backoff_s=settings.lm_retry_backoff_s,
                      max_wait_s=settings.rate_limit_max_wait_s)
