"""Configured secrets are masked in typed errors and log lines (dspex_tasks.observability.redact)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from dspex_tasks import errors
from dspex_tasks.dsl.signature import signature
from dspex_tasks.lm.errors import classify, to_lm_error
from dspex_tasks.observability import redact as redaction
from dspex_tasks.observability.redact import install, redact, redact_error, secrets_of, use_secrets
from dspex_tasks.settings import Settings
from dspex_tasks.worker.runner import classify_lm_error

pytestmark = pytest.mark.unit

KEY = "sk-fake-0123456789abcdef0123456789"
PASSWORD = "redis-pass-word-42"


@pytest.fixture(autouse=True)
def _no_process_secrets() -> Iterator[None]:
    yield
    use_secrets(None)
    for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(lg, "handlers", []):
            handler.removeFilter(redaction._FILTER)


class AuthenticationError(Exception):  # named like LiteLLM's/OpenAI's 401, never imported by the table
    pass


def test_secrets_of_reads_settings_environment_and_redis_urls() -> None:
    settings = Settings(lm_api_key=KEY, redis_url=f"redis://:{PASSWORD}@127.0.0.1:6379/0",
                        broker_url="redis://user:broker-pass-1234@h/1",
                        lm_endpoints={"openai/x": {"api_key_env": "VENDOR_X_CREDENTIAL"}})
    environ = {"OPENAI_API_KEY": "sk-openai-abcdefgh", "GITHUB_TOKEN": "ghp_tokentoken", "APP_SECRET": "s3cr3t-value",
               "VENDOR_X_CREDENTIAL": "vendor-x-key-999", "SHORT_API_KEY": "abc", "HOME": "/home/someone-long",
               "DSPEX_RESULT_BACKEND": "redis://:backend%2Fpass@h/2"}
    found = secrets_of(settings, environ)
    assert set(found) == {KEY, PASSWORD, "broker-pass-1234", "sk-openai-abcdefgh", "ghp_tokentoken", "s3cr3t-value",
                          "vendor-x-key-999", "backend%2Fpass", "backend/pass"}
    assert [len(s) for s in found] == sorted((len(s) for s in found), reverse=True)  # longest first
    assert secrets_of(None, {"X_API_KEY": "short"}) == []  # under 8 characters is not a secret


def test_redact_masks_every_secret_and_nothing_else() -> None:
    use_secrets([KEY, KEY[:12], "tiny"])
    assert redact(f"401 Incorrect API key provided: Bearer {KEY}. tiny") == "401 Incorrect API key provided: Bearer ***. tiny"
    assert redact("no secret here") == "no secret here"
    use_secrets([])
    assert redact(KEY) == KEY


def test_without_install_the_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOMEVENDOR_API_KEY", KEY)
    assert redact(f"key {KEY}") == "key ***"


def test_a_provider_401_becomes_a_redacted_typed_auth_error() -> None:
    use_secrets([KEY])
    provider = AuthenticationError(f"Incorrect API key provided: Bearer {KEY}")
    typed = to_lm_error(provider, f"LM call failed: {provider}")
    assert type(typed) is errors.LMAuthError and not typed.retryable and classify(provider) == "fatal"
    assert KEY not in str(typed) and "***" in str(typed)
    back = errors.from_remote(type(typed).__name__, list(typed.args))  # what a client rebuilds from the backend
    assert type(back) is errors.LMAuthError and KEY not in str(back)


def test_the_runner_redacts_errors_that_are_already_typed_and_their_causes() -> None:
    use_secrets([KEY])
    sig = signature("question: str -> answer: str", name="qa_redact", register=False)
    cause = ValueError(f"body: {KEY}")
    typed = errors.LMParseError(f"bad output near {KEY}", [{"field": "answer", "message": KEY}])
    typed.__cause__ = cause
    out = classify_lm_error(sig, typed)
    assert out is typed and KEY not in repr(out.args) and KEY not in str(cause)
    assert out.errors == [{"field": "answer", "message": "***"}]
    assert KEY not in str(classify_lm_error(sig, AuthenticationError(KEY)))
    assert redact_error(RuntimeError(f"x {KEY}")).args == ("x ***",)


def test_the_log_filter_masks_messages_arguments_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("dspex.test.redact")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        install(None, {"OPENAI_API_KEY": KEY, "DSPEX_REDIS_URL": f"redis://:{PASSWORD}@h/0"})
        assert redaction._FILTER in handler.filters  # every handler that exists, not just the root's
        logger.warning("call failed: %s (url %s)", f"Bearer {KEY}", f"redis://:{PASSWORD}@h/0")
        logger.warning("task %(id)s failed: %(exc)s", {"id": "t1", "exc": KEY})
        logger.warning("100% literal, no args")
        try:
            raise errors.LMError(f"refused {KEY}")
        except errors.LMError:
            logger.exception("with traceback")
        logger.warning("stack", stack_info=True, extra={"unused": KEY})
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert KEY not in text and PASSWORD not in text
    assert "call failed: Bearer *** (url redis://:***@h/0)" in text
    assert "task t1 failed: ***" in text and "100% literal, no args" in text
    assert "dspex_tasks.errors.LMError: refused ***" in text


def test_handlers_added_after_install_are_filtered_when_celery_sets_up_logging() -> None:
    from celery import signals

    install(None, {"OPENAI_API_KEY": KEY})
    late = logging.StreamHandler(io.StringIO())
    root = logging.getLogger()
    root.addHandler(late)
    try:
        signals.after_setup_logger.send(sender=None, logger=root, loglevel=logging.INFO, logfile=None,
                                        format="", colorize=False)
        assert redaction._FILTER in late.filters
    finally:
        root.removeHandler(late)
