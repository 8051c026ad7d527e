"""flower_config.py: options from the environment, authentication enforced, Flower's own FLOWER_* variables kept.

Most cases execute the file in a fresh namespace, as Flower does (tornado's ``parse_config_file`` execs it and
reads its globals); two go through Flower's real option parsing in a subprocess.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "flower_config.py"
OPTIONS = ("port", "address", "basic_auth", "persistent", "db", "state_save_interval", "max_tasks",
           "purge_offline_workers", "tasks_columns", "task_runtime_metric_buckets")


@pytest.fixture
def run_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Execute flower_config.py with exactly ``env`` (no other FLOWER_*/DSPEX_FLOWER_* variables) and ``argv``."""
    monkeypatch.chdir(tmp_path)  # the default db directory (.dspex/) is created relative to here

    def run(env: dict[str, str] | None = None, argv: list[str] | None = None) -> dict[str, Any]:
        for var in list(os.environ):
            if var.startswith(("FLOWER_", "DSPEX_FLOWER_")):
                monkeypatch.delenv(var)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(sys, "argv", argv or ["celery", "-A", "workers.app", "flower", f"--conf={CONFIG}"])
        ns = runpy.run_path(str(CONFIG))
        return {k: v for k, v in ns.items() if k in OPTIONS}

    return run


def test_basic_auth_from_flower_env_is_parsed_and_defaults_are_safe(run_config: Any, tmp_path: Path) -> None:
    opts = run_config({"FLOWER_BASIC_AUTH": "alice:s3cret, bob:pa:ss,"})
    assert opts["basic_auth"] == ["alice:s3cret", "bob:pa:ss"]
    assert opts["address"] == "127.0.0.1" and opts["port"] == 5555
    assert opts["persistent"] is True and opts["db"] == ".dspex/flower.db"
    assert (tmp_path / ".dspex").is_dir()  # shelve cannot create it
    assert opts["state_save_interval"] == 60_000 and opts["max_tasks"] == 10_000
    assert opts["purge_offline_workers"] == 600
    assert "kwargs" in opts["tasks_columns"].split(",") and "result" in opts["tasks_columns"].split(",")
    assert all(isinstance(b, float) for b in opts["task_runtime_metric_buckets"])


def test_dspex_variables_set_the_options(run_config: Any, tmp_path: Path) -> None:
    db = tmp_path / "state" / "flower.db"
    opts = run_config({"FLOWER_BASIC_AUTH": "u:p", "DSPEX_FLOWER_PORT": "7002", "DSPEX_FLOWER_ADDRESS": "0.0.0.0",
                       "DSPEX_FLOWER_DB": str(db), "DSPEX_FLOWER_MAX_TASKS": "50",
                       "DSPEX_FLOWER_PURGE_OFFLINE_WORKERS": "30", "DSPEX_FLOWER_STATE_SAVE_INTERVAL": "1000"})
    assert (opts["port"], opts["address"], opts["db"]) == (7002, "0.0.0.0", str(db))
    assert (opts["max_tasks"], opts["purge_offline_workers"], opts["state_save_interval"]) == (50, 30, 1000)
    assert db.parent.is_dir()


@pytest.mark.parametrize("address", ["0.0.0.0", "", "10.1.2.3", "::", "flower.internal"])
@pytest.mark.parametrize("insecure", [None, "1"])
def test_no_auth_off_loopback_refuses_even_with_the_insecure_flag(run_config: Any, address: str,
                                                                   insecure: str | None) -> None:
    env = {"DSPEX_FLOWER_ADDRESS": address} if address else {"FLOWER_ADDRESS": ""}
    if insecure:
        env["DSPEX_FLOWER_INSECURE"] = insecure
    with pytest.raises(SystemExit) as exc:
        run_config(env)
    message = str(exc.value.code)
    assert "refusing to start Flower without authentication" in message and "FLOWER_BASIC_AUTH" in message
    if insecure:
        assert "only honoured on a loopback address" in message


def test_no_auth_on_loopback_refuses_without_the_insecure_flag(run_config: Any) -> None:
    with pytest.raises(SystemExit, match="DSPEX_FLOWER_INSECURE=1"):
        run_config({})
    with pytest.raises(SystemExit, match="refusing"):
        run_config({"DSPEX_FLOWER_INSECURE": "0"})


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_no_auth_on_loopback_with_the_insecure_flag_is_allowed(run_config: Any, address: str) -> None:
    opts = run_config({"DSPEX_FLOWER_ADDRESS": address, "DSPEX_FLOWER_INSECURE": "true"})
    assert opts["address"] == address and "basic_auth" not in opts


def test_flower_variables_win_and_are_left_to_flower(run_config: Any) -> None:
    opts = run_config({"FLOWER_BASIC_AUTH": "u:p", "FLOWER_PORT": "7001", "DSPEX_FLOWER_PORT": "7002",
                       "FLOWER_ADDRESS": "0.0.0.0", "DSPEX_FLOWER_ADDRESS": "127.0.0.1", "FLOWER_MAX_TASKS": "5",
                       "FLOWER_PERSISTENT": "false", "FLOWER_DB": "/nonexistent/flower", "FLOWER_TASKS_COLUMNS": "name",
                       "FLOWER_PURGE_OFFLINE_WORKERS": "1", "FLOWER_STATE_SAVE_INTERVAL": "1"})
    # Assigning any of these would override the FLOWER_* value Flower already applied.
    assert set(opts) == {"basic_auth", "task_runtime_metric_buckets"}
    assert not Path("/nonexistent").exists()  # persistent is off: no directory made for its db


def test_flower_address_variable_counts_for_the_auth_check(run_config: Any) -> None:
    with pytest.raises(SystemExit, match="address '0.0.0.0'"):
        run_config({"FLOWER_ADDRESS": "0.0.0.0", "DSPEX_FLOWER_ADDRESS": "127.0.0.1", "DSPEX_FLOWER_INSECURE": "1"})


def test_command_line_options_count_for_the_auth_check(run_config: Any) -> None:
    flower = ["celery", "-A", "workers.app", "flower", f"--conf={CONFIG}"]
    with pytest.raises(SystemExit, match="address '0.0.0.0'"):
        run_config({"DSPEX_FLOWER_INSECURE": "1"}, [*flower, "--address=0.0.0.0"])
    assert run_config({}, [*flower, "--address=0.0.0.0", "--basic-auth=u:p"])["address"] == "127.0.0.1"
    assert run_config({}, [*flower, "--auth=.*@example\\.com"])  # Flower's OAuth counts as authentication


@pytest.mark.parametrize("raw", ["alice", "alice:", ":s3cret-value", "u:p,bob"])
def test_malformed_basic_auth_stops_without_echoing_passwords(run_config: Any, raw: str) -> None:
    with pytest.raises(SystemExit) as exc:
        run_config({"FLOWER_BASIC_AUTH": raw})
    message = str(exc.value.code)
    assert "must be 'user:password'" in message and "s3cret" not in message


def test_bad_integer_names_the_variable(run_config: Any) -> None:
    with pytest.raises(SystemExit, match="DSPEX_FLOWER_PORT='http'"):
        run_config({"FLOWER_BASIC_AUTH": "u:p", "DSPEX_FLOWER_PORT": "http"})


_FLOWER_PARSE = """
import json, sys
from tornado.options import options
import flower.options
from flower.command import apply_env_options, apply_options
apply_env_options()
apply_options("flower", sys.argv[1:])
print(json.dumps({name: options[name] for name in json.loads(OPTIONS)}))
"""


def _flower_parse(env: dict[str, str], *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Flower 2's own option handling (environment, then this file, then the command line) in a subprocess."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "DSPEX_"))}
    code = _FLOWER_PARSE.replace("OPTIONS", repr(json.dumps(OPTIONS)))
    return subprocess.run([sys.executable, "-c", code, f"--conf={CONFIG}", *argv], env={**base, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def test_real_flower_option_parsing_keeps_flower_env_and_command_line(tmp_path: Path) -> None:
    proc = _flower_parse({"FLOWER_BASIC_AUTH": "u:p,v:q", "FLOWER_PORT": "7001", "DSPEX_FLOWER_PORT": "7002",
                          "FLOWER_MAX_TASKS": "5", "DSPEX_FLOWER_MAX_TASKS": "6", "DSPEX_FLOWER_PURGE_OFFLINE_WORKERS": "9"},
                         "--address=127.0.0.2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    opts = json.loads(proc.stdout)
    assert (opts["port"], opts["max_tasks"], opts["purge_offline_workers"]) == (7001, 5, 9)
    assert opts["basic_auth"] == ["u:p", "v:q"] and opts["address"] == "127.0.0.2"
    assert opts["persistent"] is True and opts["db"] == ".dspex/flower.db"
    assert opts["task_runtime_metric_buckets"][-1] == 600.0


def test_real_flower_refuses_to_start_without_auth(tmp_path: Path) -> None:
    proc = _flower_parse({"DSPEX_FLOWER_INSECURE": "1"}, "--address=0.0.0.0", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "refusing to start Flower without authentication on address '0.0.0.0'" in proc.stderr
