"""One typed, frozen settings object read from ``DSPEX_*`` environment variables.

Celery's configuration is derived from it in one place (``app.celery_config``).
"""

from __future__ import annotations

import difflib
import logging
import os
from functools import cached_property
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigurationError
from .wire import CELERY_DEFAULT_QUEUE, DEFAULT_REDIS_URL, OPTIMIZE_QUEUE, PREDICT_QUEUE

__all__ = ["Settings", "load_settings"]

log = logging.getLogger(__name__)



#: Where workers look for signatures and programs unless DSPEX_SIGNATURE_MODULES says otherwise.
DEFAULT_SIGNATURE_MODULES = "signatures,signatures.programs"
#: Modules of the default that a project may not have (skipped when missing, never when named explicitly).
OPTIONAL_DEFAULT_MODULES = frozenset({"signatures.programs"})


class Settings(BaseSettings):
    """Configuration for clients and workers. Every field maps to ``DSPEX_<NAME>``.

    Example:
        >>> Settings(redis_url="redis://127.0.0.1:6380/0").broker
        'redis://127.0.0.1:6380/0'
    """

    model_config = SettingsConfigDict(env_prefix="DSPEX_", frozen=True, extra="forbid")

    # connections
    redis_url: str = DEFAULT_REDIS_URL
    broker_url: str | None = None
    result_backend: str | None = None
    redis_wait_s: float = Field(5.0, ge=0, le=25)  # a starting worker or gateway waits this long for Redis, then exits
    namespace: str = Field("dspex", pattern=r"^[A-Za-z0-9_.-]{1,64}$")

    # language model
    lm: str = "mock"
    lm_api_base: str | None = None
    lm_api_key: SecretStr | None = None
    lm_timeout_s: float = 60.0
    lm_num_retries: int = Field(2, ge=0, le=10)
    lm_max_tokens: int | None = None
    lm_cache: bool = False
    mock_latency_ms: float = Field(0.0, ge=0)
    mock_failure_rate: float = Field(0.0, ge=0, le=1)
    mock_seed: int = 0
    mock_scenario: str | None = None
    # the model optimizers reflect with (GEPA); unset: the task's own LM (optimize.optimizers.reflection_lm)
    reflection_lm: str | None = None

    # LM control (dspex_tasks.lm.governed): fleet-wide rate limits, shared response cache, fallbacks
    rate_limits: dict[str, dict[str, float]] = Field(default_factory=dict)  # model -> {rpm, tpm, burst, ...}
    rate_limit_max_wait_s: float = Field(1.0, ge=0)  # longest in-thread wait; longer re-queues the task
    # No fleet rate-limit slot is reserved further ahead (a longer backlog fails the task: LMRateLimitError); and
    # a task re-queued for its slot gets countdowns of at most this (and half the visibility timeout).
    rate_limit_max_queue_s: float = Field(3600.0, gt=0)
    rate_limit_max_countdown_s: float = Field(1800.0, gt=0)
    rate_limit_max_requeues: int = Field(200, ge=0)  # deprecated, ignored: the wait is bounded by time (above)
    lm_shared_cache: bool = False  # every signature uses the Redis LM cache (else per signature: cache=True)
    lm_cache_ttl_s: int = Field(86_400, gt=0)
    lm_cache_max_entries: int = Field(100_000, ge=1)
    lm_fallbacks: str | None = None  # "m1,m2": tried in order after a signature's model is exhausted
    lm_endpoints: dict[str, dict[str, Any]] = Field(default_factory=dict)  # model -> {api_base, api_key_env, ...}
    lm_retry_backoff_s: float = Field(0.5, ge=0)  # first in-thread retry delay (doubles; Retry-After wins)

    # signatures and programs
    # the default's signatures.programs is optional: a project's own signatures package may have no programs
    signature_modules: str = DEFAULT_SIGNATURE_MODULES
    prewarm_sessions: int = Field(100, ge=0)
    program_cache_size: int = Field(1024, ge=1)
    cache_verify_s: float = Field(1.0, gt=0)
    session_ttl_s: int | None = Field(None, gt=0)
    # LM usage is also kept per UTC hour (charts over time: console, `dspex usage --hours`) for this long
    usage_history_days: int = Field(30, ge=1, le=400)
    max_state_bytes: int = Field(2_000_000, gt=0)
    max_payload_bytes: int = Field(1_000_000, gt=0)  # a message body over twice this is refused undecoded
    accept_compression: bool = False  # compressed messages are refused unless set (then inflated up to the cap)

    # workers and queues
    # modules defining aforward (Predict, ChainOfThought, ReAct with async tools, user modules) run as coroutines
    # on one event loop per worker process; off: every module runs in the task's thread
    async_modules: bool = True
    # clients publish Celery's task-sent event (Flower lists a task while it is queued); off: Flower lists it
    # from its worker's task-received, and a submit costs about what a plain send_task does
    sent_events: bool = True
    # workers send Celery's task events (what Flower shows), batched every 100 ms; off: Flower shows no tasks
    task_events: bool = True
    # the most predictions a process's event loop runs at once (map items; single tasks are bounded by threads)
    async_max_in_flight: int = Field(1000, ge=1)
    worker_pool: Literal["threads", "prefork", "solo"] = "threads"
    worker_concurrency: int = Field(200, ge=1)
    prefetch_multiplier: int = Field(1, ge=1)
    visibility_timeout_s: int = Field(3600, ge=10)
    result_expires_s: int = Field(86_400, ge=60)
    task_max_retries: int = Field(3, ge=0)
    map_chunk_size: int = Field(64, ge=1)
    # a stream=True job's events: at most this many entries, kept this long after the last one
    stream_maxlen: int = Field(10_000, ge=10)
    stream_ttl_s: int = Field(3600, ge=10)
    lease_ttl_s: float = Field(30.0, ge=2)
    max_deliveries: int = Field(5, ge=1)
    redis_socket_timeout_s: float = Field(10.0, gt=1)
    redis_max_connections: int = Field(200, ge=1)  # per pool (each client, the result backend, the broker)
    redis_pool_wait_s: float = Field(5.0, gt=0)  # a command waits this long for a free pooled connection
    # A result write Redis refuses because it is full (maxmemory) is retried this long, with consumption paused,
    # before the task gives up and its message is requeued (dspex_tasks.worker.storefull).
    store_full_wait_s: float = Field(180.0, ge=0)
    allow_unsafe_eviction: bool = False
    # A Redis broker's messages move from the queue to the unacked hash in one Lua script (no kill can lose
    # one between the two); a living worker keeps extending the visibility of every message it holds.
    reliable_fetch: bool = True
    # A RabbitMQ broker's dspex queues: classic, or quorum (replicated; x-delivery-limit = DSPEX_MAX_DELIVERIES,
    # topic exchanges so countdowns use RabbitMQ's native delayed delivery). Not a Redis broker's concern.
    amqp_queue_type: Literal["classic", "quorum"] = "classic"
    track_started: bool = False
    log_each_task: bool = False
    predict_queue: str = PREDICT_QUEUE
    optimize_queue: str = OPTIMIZE_QUEUE
    # The queue a Celery client with no dspex configuration sends to; default workers serve it too ("": none).
    bare_queue: str = CELERY_DEFAULT_QUEUE

    # HTTP gateway
    gateway_auth: bool = True
    gateway_rate_per_min: int = Field(600, ge=0)
    gateway_max_body_bytes: int = Field(1_000_000, gt=0)
    # the web console's (/console) cookie signing key; unset: a random one per gateway process (logins end at a
    # restart and do not span --workers processes)
    console_secret: SecretStr | None = Field(None, min_length=16)
    console_session_s: int = Field(8 * 3600, ge=60, le=30 * 86400)  # how long a console login lasts

    # observability
    metrics_port: int | None = Field(None, ge=0, le=65535)  # /metrics per worker process; 0: any free port
    # the address /metrics binds: loopback unless Prometheus scrapes from elsewhere (deploy/ sets 0.0.0.0)
    metrics_host: str = Field("127.0.0.1", min_length=1, max_length=255)
    otel: bool = False  # OpenTelemetry tracing of tasks (dspex_tasks.observability.tracing; needs the [otel] extra)

    @field_validator("redis_url", "broker_url", "result_backend")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://", "amqp://", "amqps://",
                                               "pyamqp://")):
            raise ValueError(f"expected a redis://, rediss://, amqp:// or amqps:// URL, got {v!r}")
        return v

    @field_validator("rate_limits")
    @classmethod
    def _limits(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        from .lm.limits import parse_limits

        for model, spec in v.items():
            parse_limits(spec, f"model:{model}")  # raises ValueError naming the bad key
        return v

    @model_validator(mode="after")
    def _visibility_outlasts_lm_calls(self) -> Settings:
        """Refuse a visibility timeout a running prediction can outlast: its message would be redelivered
        and run again at the same time (issue 13: 3 and 5 concurrent runs, then a false DeadLettered)."""
        budget = self.longest_lm_call_s
        if self.visibility_timeout_s <= budget:
            models = len(self._fallbacks) + 1
            formula = (f"DSPEX_LM_TIMEOUT_S={self.lm_timeout_s:g} x (DSPEX_LM_NUM_RETRIES={self.lm_num_retries} + 1)"
                       " + backoff")
            if models > 1:
                formula = f"({formula}) x {models} models (DSPEX_LM_FALLBACKS)"
            raise ValueError(
                f"DSPEX_VISIBILITY_TIMEOUT_S={self.visibility_timeout_s} is shorter than the longest LM call a task "
                f"may make ({formula} = {budget:g} s): a running task's message would be redelivered and run again "
                f"at the same time; raise DSPEX_VISIBILITY_TIMEOUT_S above {budget:g} or lower the LM timeout")
        return self

    @property
    def _fallbacks(self) -> list[str]:
        return [m for m in (f.strip() for f in (self.lm_fallbacks or "").split(",")) if m and m != self.lm.strip()]

    @property
    def longest_lm_call_s(self) -> float:
        """The longest one LM call of a task may take, retries and fallbacks included (seconds).

        Per model: ``DSPEX_LM_TIMEOUT_S x (DSPEX_LM_NUM_RETRIES + 1)`` plus the in-thread delays before
        each retry (``DSPEX_LM_RETRY_BACKOFF_S`` doubling per retry, capped at 4 s, +20% jitter; or a
        ``Retry-After`` up to ``DSPEX_RATE_LIMIT_MAX_WAIT_S``), times the models of ``DSPEX_LM_FALLBACKS``.
        Per-endpoint ``timeout`` overrides and routes given per signature (``lm=[...]``) are not counted.
        """
        from .lm.limits import BACKOFF_JITTER, backoff_s  # the delay lm.governed.retry_delay sleeps

        # a Retry-After is slept in-thread only up to DSPEX_RATE_LIMIT_MAX_WAIT_S
        backoff = sum(max(backoff_s(self.lm_retry_backoff_s, i) * BACKOFF_JITTER[1], self.rate_limit_max_wait_s)
                      for i in range(self.lm_num_retries))
        per_model = self.lm_timeout_s * (self.lm_num_retries + 1) + backoff
        return float(round(per_model * (len(self._fallbacks) + 1), 3))

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def broker_is_redis(self) -> bool:
        """Whether the broker is Redis (else RabbitMQ over AMQP)."""
        return self.broker.startswith(("redis://", "rediss://", "unix://"))

    @property
    def backend(self) -> str:
        return self.result_backend or self.redis_url

    @property
    def queues(self) -> list[str]:
        """Every queue a worker consumes unless told otherwise (``-Q``): predictions, optimizations, bare clients."""
        return list(dict.fromkeys(q for q in (self.predict_queue, self.optimize_queue, self.bare_queue) if q))

    @property
    def redis_url_source(self) -> str:
        """Where ``redis_url`` came from, for start-up lines: the variable, or that it is the default."""
        return "DSPEX_REDIS_URL" if "redis_url" in self.model_fields_set else "default; set DSPEX_REDIS_URL"

    @cached_property
    def modules(self) -> list[str]:
        return [m.strip() for m in self.signature_modules.split(",") if m.strip()]

    def lm_api_key_value(self) -> str | None:
        return self.lm_api_key.get_secret_value() if self.lm_api_key else None


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, with keyword overrides.

    Unknown ``DSPEX_*`` variables are reported with a did-you-mean (a typo in an
    env var should not silently fall back to a default).

    Raises:
        ConfigurationError: naming the bad setting and what was expected.
    """
    known = {f"DSPEX_{name.upper()}" for name in Settings.model_fields}
    for var in os.environ:
        if var.startswith("DSPEX_") and var not in known and not var.startswith(("DSPEX_TEST_", "DSPEX_FLOWER_")):
            close = difflib.get_close_matches(var, sorted(known), n=1)
            log.warning("unknown setting %s%s", var, f"; did you mean {close[0]}?" if close else "")
    try:
        return Settings(**overrides)
    except ValidationError as exc:  # one line per bad setting, named as the user sets it
        problems = "; ".join(  # a check across settings (empty loc) names its variables itself
            (f"DSPEX_{'_'.join(str(p) for p in e['loc']).upper()}: " if e["loc"] else "")
            + e["msg"].removeprefix("Value error, ") for e in exc.errors(include_url=False))
        raise ConfigurationError(f"invalid settings: {problems}") from None
