"""Language model construction from settings: the mock LM or any LiteLLM model string.

Keys come from ``DSPEX_LM_API_KEY`` or the provider's own variable (LiteLLM reads
``OPENAI_API_KEY`` etc.), live only in the worker, and never enter a message.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# LiteLLM and DSPy otherwise fetch a model price map from the internet at first use
# (a 5 s stall where there is no route); the bundled copy is enough.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

if TYPE_CHECKING:  # pragma: no cover
    from ..settings import Settings


def build_lm(settings: Settings, model: str | None = None, *, num_retries: int | None = None) -> Any:
    """The DSPy LM for ``model`` (default ``settings.lm``).

    ``DSPEX_LM_ENDPOINTS`` may give a model its own ``api_base``, ``api_key_env`` (the variable holding
    its key), ``timeout`` or ``max_tokens``; ``num_retries`` overrides ``DSPEX_LM_NUM_RETRIES`` (the
    governed LM passes 0: it retries itself).
    """
    import dspy

    model = model or settings.lm
    if model == "mock":
        from collections import ChainMap

        from ..testing.mock_lm import SCRIPTS, MockLM
        from ..testing.mockgen import SCENARIOS

        # SCRIPTS first: answers a test scripts while the worker runs (the pytest plugin's dspex_mock fixture)
        scenario: dict[str, Any] = {"*": SCENARIOS[settings.mock_scenario]} if settings.mock_scenario else {}
        return MockLM(seed=settings.mock_seed, latency_ms=settings.mock_latency_ms,
                      failure_rate=settings.mock_failure_rate, scripted=ChainMap(SCRIPTS, scenario))
    kwargs: dict[str, Any] = {"cache": settings.lm_cache, "timeout": settings.lm_timeout_s,
                              "num_retries": settings.lm_num_retries if num_retries is None else num_retries}
    if settings.lm_api_base:
        kwargs["api_base"] = settings.lm_api_base
    if settings.lm_api_key:
        kwargs["api_key"] = settings.lm_api_key_value()
    if settings.lm_max_tokens:
        kwargs["max_tokens"] = settings.lm_max_tokens
    endpoint = dict(settings.lm_endpoints.get(model) or {})
    if "api_key_env" in endpoint:
        kwargs["api_key"] = os.environ.get(str(endpoint.pop("api_key_env")))
    kwargs.update({k: endpoint[k] for k in ("api_base", "timeout", "max_tokens") if k in endpoint})
    return dspy.LM(model, **{k: v for k, v in kwargs.items() if v is not None})


def lm_name(lm: Any) -> str:
    return str(getattr(lm, "model", "unknown"))


def native_async(lm: Any) -> bool:
    """Whether ``lm`` answers ``aforward`` with the same behaviour as ``forward``, as a coroutine.

    A class that overrides ``forward`` but inherits an older ``aforward`` (a test double, a user's legacy
    ``BaseLM`` subclass, whose inherited ``aforward`` would bypass its ``forward`` or raise) does not: its calls
    run ``forward`` in a thread.
    """
    import inspect

    cls = type(lm)
    forward = next((c for c in cls.__mro__ if "forward" in vars(c)), None)
    aforward = next((c for c in cls.__mro__ if "aforward" in vars(c)), None)
    if forward is None or aforward is None or not inspect.iscoroutinefunction(vars(aforward)["aforward"]):
        return False
    return issubclass(aforward, forward)
