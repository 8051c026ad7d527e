"""The CLI on hostile input files and ids: one red line and exit 2, never a traceback (no Redis is reached)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _dspex(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DSPEX_REDIS_URL": "redis://127.0.0.1:1/0", "COLUMNS": "200",
           "PYTHONPATH": str(ROOT), "DSPEX_MAX_STATE_BYTES": "100000"}
    return subprocess.run([sys.executable, "-m", "dspex_tasks", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=60)


def _one_red_line(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error:") and needle in r.stderr, r.stderr


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "deep.json").write_text("[" * 10_000 + "]" * 10_000)
    (tmp_path / "deep70.json").write_text('{"demos": ' + "[" * 70 + "]" * 70 + "}")
    (tmp_path / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    (tmp_path / "nan.json").write_text('{"demos": [{"question": "q", "answer": NaN}]}')
    (tmp_path / "big.json").write_text('{"instructions": "' + "x" * 100_001 + '"}')
    (tmp_path / "deep.jsonl").write_text('{"question": "q"}\n{"question": ' + "[" * 10_000 + "]" * 10_000 + "}\n")
    (tmp_path / "binary.jsonl").write_bytes(b'{"question": "q"}\n\xff\xfe\x00\x01\n')
    (tmp_path / "nan.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": "q", "answer": Infinity}\n')
    (tmp_path / "array.json").write_text('[{"question": "q", "answer": "a"}, 3]')
    (tmp_path / "array_nan.json").write_text('[{"question": "q", "answer": NaN}]')
    return tmp_path


@pytest.mark.parametrize(("args", "needle"), [
    (("map", "qa", "deep.jsonl"), "deep.jsonl:2"),
    (("map", "qa", "binary.jsonl"), "not UTF-8"),
    (("map", "qa", "nan.jsonl"), "nan.jsonl:2"),
    (("datasets", "put", "d1", "nan.jsonl"), "Infinity"),
    (("datasets", "put", "d1", "deep.jsonl"), "deep.jsonl:2"),
    (("datasets", "put", "d1", "array.json"), "array.json[1]: expected a JSON object"),
    (("datasets", "put", "d1", "array_nan.json"), "NaN"),
    (("programs", "put", "s1", "qa", "deep.json"), "deep.json"),
    (("programs", "put", "s1", "qa", "deep70.json"), "deeper than 64 levels"),
    (("programs", "put", "s1", "qa", "binary.json"), "not UTF-8"),
    (("programs", "put", "s1", "qa", "nan.json"), "NaN"),
    (("programs", "put", "s1", "qa", "big.json"), "larger than 100000 bytes"),
    (("programs", "put", "s1", "qa", "/dev/zero"), "larger than 100000 bytes"),
])
def test_a_deep_binary_nan_or_huge_file_is_one_red_line_and_exit_2(files: Path, args: tuple[str, ...],
                                                                    needle: str) -> None:
    _one_red_line(_dspex(*args, cwd=files), needle)


@pytest.mark.parametrize("command", ["show", "cancel", "plot"])
def test_a_malformed_run_id_is_invalid_id_and_exit_2(tmp_path: Path, command: str) -> None:
    _one_red_line(_dspex("runs", command, "0123456789abcdef0123456789abcdef:ckpt:data", cwd=tmp_path), "invalid run id")
