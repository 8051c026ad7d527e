"""A deterministic, typed mock language model for DSPy programs.

``MockLM`` answers DSPy ChatAdapter and JSONAdapter prompts with type-correct
values derived from a hash of its seed and the inputs (see
:mod:`dspex_tasks.testing.mockgen`), so programs run end to end through DSPy's real
adapters and parsers without a provider.

It hooks into DSPy 3.4 as a legacy ``BaseLM`` subclass: ``BaseLM.__call__``
runs ``dspy.clients.execution.prepare/execute``, which wraps any subclass
without an ``_engine_spec`` in ``LegacyEngine``; that calls :meth:`MockLM.forward`
(``aforward`` for ``acall``) and reads the OpenAI-shaped response it returns.
On that path DSPy adds no cache, no retries and no error wrapping, so the
latency and failure knobs apply to every call and injected failures surface as
:class:`dspex_tasks.errors.LMError`. DSPy emits a ``DeprecationWarning`` for the
legacy interface (supported throughout 3.4).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import dspy

from ..dsl.signature import SignatureRegistry
from ..errors import LMError
from ..lm.gate import pass_gate
from ..lm.response import Response, as_response
from . import mockgen

__all__ = ["MockLM", "SCRIPTS"]

#: Scripted answers every worker-built mock LM of this process consults first, by signature name or ``"*"``
#: (what :func:`dspex_tasks.testing.plugin.dspex_mock` sets for one test; empty otherwise).
SCRIPTS: dict[str, Any] = {}


class _Counter:
    """A thread-safe call counter, shared by an LM and its copies, with the latest requests' parameters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0
        self.params: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)

    def next(self) -> int:
        with self._lock:
            self.value += 1
            return self.value


class MockLM(dspy.BaseLM):  # type: ignore[misc]
    """Deterministic typed mock LM: same prompt and seed, same answer.

    Args:
        seed: Changes every generated value (and the failure draws).
        latency_ms: Sleep this long in every call (``asyncio.sleep`` in async calls).
        failure_rate: Probability in [0, 1] that a call raises :class:`~dspex_tasks.errors.LMError`.
        scripted: ``{signature name or "*": outputs dict | callable(inputs[, demos]) -> outputs dict}``;
            given fields override generated ones (see :func:`dspex_tasks.testing.mockgen.answer`).
        registry: Signatures used for precise output types (default: the process-wide registry).
        model: The model name reported in responses and usage.

    Example:
        >>> with dspy.context(lm=MockLM(seed=1)):  # doctest: +SKIP
        ...     dspy.Predict(sig.to_dspy())(question="hi")
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        latency_ms: float = 0.0,
        failure_rate: float = 0.0,
        scripted: mockgen.Scripted | None = None,
        registry: SignatureRegistry | None = None,
        model: str = "mock/dspex",
    ) -> None:
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be within [0, 1], got {failure_rate}")
        if latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {latency_ms}")
        super().__init__(model=model, model_type="chat", temperature=0.0, max_tokens=4000, cache=False, num_retries=0)
        self.seed = seed
        self.latency_ms = float(latency_ms)
        self.failure_rate = float(failure_rate)
        self.scripted = scripted
        self.registry = registry
        self._counter = _Counter()

    @property
    def calls(self) -> int:
        """How many requests this LM (and its ``copy()``s, which share the count) has received, failed ones too."""
        return self._counter.value

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The generation parameters of the latest 1,000 requests (this LM's and its copies'), oldest first:
        its own settings (``copy(temperature=...)`` ones included) overridden by the call's, as a provider
        would receive them."""
        return list(self._counter.params)

    def _start(self) -> int:
        return self._counter.next()

    def _record(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The request's parameters, as :attr:`requests` lists them."""
        params = {**self.kwargs, **kwargs}  # as dspy.LM sends its own settings with every request
        self._counter.params.append(params)
        return params

    def _fail_now(self, messages: Sequence[Mapping[str, Any]], attempt: int) -> None:
        if self.failure_rate <= 0.0:
            return
        key = f"{self.seed}|fail|{attempt}|{mockgen.message_text(messages[-1]) if messages else ''}"
        if mockgen._frac(key) < self.failure_rate:
            raise LMError(f"mock LM injected failure (call {attempt}, failure_rate={self.failure_rate})")

    def _messages(self, prompt: Any, messages: Any) -> list[dict[str, Any]]:
        if messages is not None:
            return [dict(m) for m in messages]
        return [{"role": "user", "content": "" if prompt is None else str(prompt)}]

    def _respond(self, messages: list[dict[str, Any]], params: Mapping[str, Any]) -> Response:
        n = params.get("n") or 1
        texts = [
            mockgen.answer(messages, seed=self.seed + i, scripted=self.scripted, registry=self.registry)
            for i in range(int(n))
        ]
        prompt_tokens = mockgen.prompt_tokens(messages)
        completion_tokens = sum(mockgen.count_tokens(t) for t in texts)
        return as_response(
            {
                "id": f"chatcmpl-mock-{uuid.uuid4().hex[:12]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [
                    {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                    for i, t in enumerate(texts)
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Response:
        """Answer one request with an OpenAI ChatCompletion-shaped response.

        Raises:
            LMError: when the failure knob fires.
        """
        pass_gate()  # a cancelled job stops before the call, as with a real LM (dspex_tasks.lm.gate)
        msgs = self._messages(prompt, messages)
        params = self._record(kwargs)
        attempt = self._start()
        if self.latency_ms > 0:
            time.sleep(self.latency_ms / 1000.0)
        self._fail_now(msgs, attempt)
        return self._respond(msgs, params)

    async def aforward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Response:
        """Async :meth:`forward` (sleeps with ``asyncio.sleep``)."""
        pass_gate()
        msgs = self._messages(prompt, messages)
        params = self._record(kwargs)
        attempt = self._start()
        if self.latency_ms > 0:
            await asyncio.sleep(self.latency_ms / 1000.0)
        self._fail_now(msgs, attempt)
        return self._respond(msgs, params)

    def dump_state(self) -> dict[str, Any]:
        """The knobs (not ``scripted`` or ``registry``) so ``load_state`` can rebuild an equal mock."""
        return {
            "_dspy_lm_class": f"{type(self).__module__}.{type(self).__qualname__}",
            "model": self.model,
            "seed": self.seed,
            "latency_ms": self.latency_ms,
            "failure_rate": self.failure_rate,
        }

    @classmethod
    def load_state(cls, state: dict[str, Any], **_: Any) -> MockLM:
        """Rebuild a mock from :meth:`dump_state` output."""
        known = {k: state[k] for k in ("model", "seed", "latency_ms", "failure_rate") if k in state}
        return cls(**known)

    def __repr__(self) -> str:
        return f"MockLM(seed={self.seed}, latency_ms={self.latency_ms}, failure_rate={self.failure_rate})"
