"""Settings refuse a visibility timeout that an LM call can outlast (issue 13): the running task's message
would be redelivered and run again at the same time."""

from __future__ import annotations

import math
import os

import pytest

from dspex_tasks.errors import ConfigurationError
from dspex_tasks.settings import Settings, load_settings

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("DSPEX_") and not var.startswith("DSPEX_TEST_"):
            monkeypatch.delenv(var)


def test_defaults_are_accepted_with_the_documented_budget() -> None:
    s = load_settings()
    # 60 x (2 + 1) + backoff before retry 1 and 2: max(0.5 x 1.2, 1.0 Retry-After) + max(1.0 x 1.2, 1.0)
    assert s.longest_lm_call_s == pytest.approx(182.2)
    assert s.visibility_timeout_s == 3600


def test_a_short_visibility_timeout_is_refused_naming_both_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPEX_VISIBILITY_TIMEOUT_S", "20")
    with pytest.raises(ConfigurationError) as err:
        load_settings()
    msg = str(err.value)
    assert msg == ("invalid settings: DSPEX_VISIBILITY_TIMEOUT_S=20 is shorter than the longest LM call a task may "
                   "make (DSPEX_LM_TIMEOUT_S=60 x (DSPEX_LM_NUM_RETRIES=2 + 1) + backoff = 182.2 s): a running "
                   "task's message would be redelivered and run again at the same time; raise "
                   "DSPEX_VISIBILITY_TIMEOUT_S above 182.2 or lower the LM timeout")
    assert "\n" not in msg and "DSPEX_?" not in msg


@pytest.mark.parametrize("env", [
    {"DSPEX_LM_TIMEOUT_S": "25", "DSPEX_LM_NUM_RETRIES": "0"},   # the 3 concurrent runs at 10 s
    {"DSPEX_LM_TIMEOUT_S": "3", "DSPEX_LM_NUM_RETRIES": "3", "DSPEX_LM_RETRY_BACKOFF_S": "2"},
    {"DSPEX_LM_TIMEOUT_S": "3", "DSPEX_LM_NUM_RETRIES": "1", "DSPEX_LM_FALLBACKS": "openai/b,openai/c"},
    {"DSPEX_LM_TIMEOUT_S": "55", "DSPEX_LM_NUM_RETRIES": "10"},
])
def test_refused_at_the_boundary_and_accepted_one_second_above(monkeypatch: pytest.MonkeyPatch,
                                                              env: dict[str, str]) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    budget = Settings(visibility_timeout_s=100_000).longest_lm_call_s
    assert budget >= 10  # the field's own minimum
    monkeypatch.setenv("DSPEX_VISIBILITY_TIMEOUT_S", str(math.floor(budget)))  # equal to a whole budget: refused
    with pytest.raises(ConfigurationError, match="DSPEX_VISIBILITY_TIMEOUT_S=.* is shorter than .*DSPEX_LM_TIMEOUT_S="):
        load_settings()
    monkeypatch.setenv("DSPEX_VISIBILITY_TIMEOUT_S", str(math.floor(budget) + 1))
    assert load_settings().visibility_timeout_s > budget


def test_the_budget_counts_backoff_cap_fallbacks_and_in_thread_retry_after() -> None:
    base = Settings(lm_timeout_s=10, lm_num_retries=2, lm_retry_backoff_s=0, rate_limit_max_wait_s=0)
    assert base.longest_lm_call_s == 30
    capped = Settings(lm_timeout_s=10, lm_num_retries=2, lm_retry_backoff_s=100, rate_limit_max_wait_s=0)
    assert capped.longest_lm_call_s == pytest.approx(30 + 2 * 4.0 * 1.2)
    waits = Settings(lm_timeout_s=10, lm_num_retries=2, lm_retry_backoff_s=0, rate_limit_max_wait_s=5)
    assert waits.longest_lm_call_s == 40
    fallbacks = Settings(lm="openai/a", lm_timeout_s=10, lm_num_retries=2, lm_retry_backoff_s=0,
                         rate_limit_max_wait_s=0, lm_fallbacks="openai/a, openai/b,,openai/c")
    assert fallbacks.longest_lm_call_s == 90  # the primary is not counted twice


def test_a_field_error_keeps_its_variable_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPEX_VISIBILITY_TIMEOUT_S", "5")
    with pytest.raises(ConfigurationError, match=r"^invalid settings: DSPEX_VISIBILITY_TIMEOUT_S: "):
        load_settings()
