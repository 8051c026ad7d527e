"""What a worker says and checks at start: queues, Redis lines, signature-module errors, DSPy's logging."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

from dspex_tasks.app import celery_config, create_app
from dspex_tasks.connections import redacted_url, unreachable_message
from dspex_tasks.errors import ConfigurationError
from dspex_tasks.settings import Settings, load_settings
from dspex_tasks.worker.runtime import import_signature_modules
from dspex_tasks.worker.startup import RedisUnreachable, preflight, redis_line, route_dspy_logging

pytestmark = pytest.mark.unit


def test_default_workers_consume_every_dspex_queue_and_celerys_default() -> None:
    conf = celery_config(Settings())
    assert [q.name for q in conf["task_queues"]] == ["dspex.predict", "dspex.optimize", "celery"]
    assert conf["task_default_queue"] == "dspex.predict"  # our own client still routes explicitly
    assert [q.name for q in celery_config(Settings(bare_queue=""))["task_queues"]] == ["dspex.predict",
                                                                                       "dspex.optimize"]
    app = create_app(Settings())
    try:  # what a worker without -Q consumes
        assert sorted(app.amqp.queues) == ["celery", "dspex.optimize", "dspex.predict"]
    finally:
        app.close()


def test_redacted_url_masks_only_a_password() -> None:
    assert redacted_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redacted_url("redis://:s3cret@h:1/2") == "redis://:***@h:1/2"
    assert redacted_url("redis://user:s3cret@h:1/2") == "redis://user:***@h:1/2"
    assert redacted_url("redis://user@h:1/2") == "redis://user@h:1/2"


def test_worker_banner_does_not_invent_a_password() -> None:
    app = create_app(Settings(redis_url="redis://127.0.0.1:6390/4"))
    try:
        worker = app.Worker(hostname="t@h", without_mingle=True, without_gossip=True)
        banner = worker.startup_info(artlines=False)
        assert "redis://127.0.0.1:6390/4" in banner and ":**@" not in banner
        assert "Redis redis://127.0.0.1:6390/4 (db 4" in banner
    finally:
        from celery._state import _set_task_join_will_block
        from kombu.asynchronous import set_event_loop

        # The unstarted worker set process-wide state that later tests in this process would inherit: kombu's hub
        # (a later in-process worker's countdown tasks would never run) and its pool's "joining a result would
        # block" flag (every result.get() here would raise "Never call result.get() within a task!").
        set_event_loop(None)
        _set_task_join_will_block(False)
        app.close()


def test_redis_line_says_where_the_url_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSPEX_REDIS_URL", raising=False)
    assert "(db 0, default; set DSPEX_REDIS_URL)" in redis_line(load_settings())
    monkeypatch.setenv("DSPEX_REDIS_URL", "redis://:pw@10.0.0.5:6380/7")
    line = redis_line(load_settings())
    assert line.startswith("Redis redis://:***@10.0.0.5:6380/7 (db 7, DSPEX_REDIS_URL)") and "pw" not in line


def test_unreachable_names_the_url_the_reason_and_the_variable() -> None:
    exc = ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
    unset = unreachable_message("cannot reach Redis", "redis://127.0.0.1:6379/0", exc, configured=False)
    assert unset == ("cannot reach Redis at redis://127.0.0.1:6379/0 (Connection refused); DSPEX_REDIS_URL is "
                     "not set, so the default was tried: set it to your Redis")
    given = unreachable_message("cannot reach Redis", "redis://:pw@h:1/0", exc)
    assert "redis://:***@h:1/0" in given and "pw@" not in given and "DSPEX_REDIS_URL" in given


def test_preflight_gives_up_after_the_wait() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", redis_wait_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(RedisUnreachable) as info:
        preflight(settings, what="worker")
    assert 0.5 <= time.monotonic() - t0 < 5
    message = str(info.value)
    assert "\n" not in message and "redis://127.0.0.1:1/0" in message and "DSPEX_REDIS_URL" in message


def test_settings_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPEX_WORKER_CONCURRENCY", "lots")
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert "\n" not in str(info.value) and "DSPEX_WORKER_CONCURRENCY: Input should be a valid integer" in str(info.value)


# -- signature modules ------------------------------------------------------------------------------
@pytest.fixture
def in_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delenv("PYTHONPATH", raising=False)
    return tmp_path


def test_signature_module_in_the_current_directory_is_found(in_dir: Path) -> None:
    (in_dir / "cwd_sigs_ok.py").write_text("VALUE = 42\n")
    try:
        assert import_signature_modules(["cwd_sigs_ok"]) == ["cwd_sigs_ok"]
        assert sys.modules["cwd_sigs_ok"].VALUE == 42
    finally:
        sys.modules.pop("cwd_sigs_ok", None)


def test_missing_signature_module_is_one_line_naming_the_variable_and_path(in_dir: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        import_signature_modules(["nowhere_sigs"])
    message = str(info.value)
    assert "\n" not in message
    assert "'nowhere_sigs'" in message and "DSPEX_SIGNATURE_MODULES=nowhere_sigs" in message
    assert f"current directory ({in_dir})" in message and "PYTHONPATH (unset)" in message


def test_a_failing_signature_module_names_its_own_error_and_line(in_dir: Path) -> None:
    (in_dir / "broken_sigs.py").write_text("x = 1\nimport not_installed_dep_xyz\n")
    (in_dir / "typo_sigs.py").write_text("from dspex_tasks import signature\nqa = signatur('q: str -> a: str')\n")
    try:
        with pytest.raises(ConfigurationError) as info:
            import_signature_modules(["broken_sigs"])
        assert str(info.value) == ("signature module 'broken_sigs' failed to import: ModuleNotFoundError: "
                                   "No module named 'not_installed_dep_xyz' (broken_sigs.py:2)")
        with pytest.raises(ConfigurationError, match=r"NameError: name 'signatur' is not defined \(typo_sigs.py:2\)"):
            import_signature_modules(["typo_sigs"])
    finally:
        sys.modules.pop("broken_sigs", None)
        sys.modules.pop("typo_sigs", None)


# -- DSPy's logging inside workers -------------------------------------------------------------------
def test_dspy_log_lines_go_through_logging_at_their_own_level(caplog: pytest.LogCaptureFixture,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import dspy  # noqa: F401 - installs its own stderr handler
    import tqdm.std
    from dspy.utils.logging_utils import configure_dspy_loggers

    tqdm_init = tqdm.std.tqdm.__init__
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    configure_dspy_loggers("dspy")  # as on import: own handler, INFO, no propagation
    dspy_log = logging.getLogger("dspy")
    try:
        route_dspy_logging()
        assert not [h for h in dspy_log.handlers if getattr(h, "name", None) == "dspy_handler"]
        with caplog.at_level(logging.INFO):
            logging.getLogger("dspy.teleprompt.mipro").info("Bootstrapping N=5 sets of demonstrations...")
        assert {(r.name, r.levelname) for r in caplog.records} == {("dspy.teleprompt.mipro", "INFO")}
        assert "Bootstrapping" not in capsys.readouterr().err  # not written around logging
        caplog.clear()
        with caplog.at_level(logging.WARNING):  # the worker's --loglevel decides
            logging.getLogger("dspy.teleprompt.mipro").info("hidden at WARNING")
        assert caplog.records == []
        assert tqdm.tqdm(range(3)).disable and tqdm.tqdm(range(3), disable=False).disable  # no bars in workers
    finally:
        tqdm.std.tqdm.__init__ = tqdm_init
        configure_dspy_loggers("dspy")
        monkeypatch.delenv("TQDM_DISABLE", raising=False)


def test_the_defaults_programs_module_is_optional_but_a_named_one_is_not(in_dir: Path) -> None:
    """A project's own ``signatures`` package without a ``programs`` subpackage works with the default."""
    (in_dir / "mysigs_pkg").mkdir()
    (in_dir / "mysigs_pkg" / "__init__.py").write_text("VALUE = 1\n")
    try:
        optional = frozenset({"mysigs_pkg.programs"})
        assert import_signature_modules(["mysigs_pkg", "mysigs_pkg.programs"], optional=optional) == ["mysigs_pkg"]
        with pytest.raises(ConfigurationError, match="cannot import signature module 'mysigs_pkg.programs'"):
            import_signature_modules(["mysigs_pkg", "mysigs_pkg.programs"])
        with pytest.raises(ConfigurationError, match="'nowhere_pkg'"):  # the package itself is never optional
            import_signature_modules(["nowhere_pkg", "nowhere_pkg.programs"], optional=frozenset({"nowhere_pkg.programs"}))
    finally:
        sys.modules.pop("mysigs_pkg", None)
