"""Layer 3: the ``dspex`` command line, run as a real process against a real worker process and Redis."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests._procs import ROOT, WorkerProcess, wait_for
from tests.system._cli import CliTarget, Dspex, processes_with_env, wait_until_gone

pytestmark = [pytest.mark.system, pytest.mark.usefixtures("cli_worker")]


def test_signatures_lists_the_published_reference_signatures(dspex: Dspex) -> None:
    # Given a worker that published its signatures, when they are listed
    table = dspex("signatures")
    as_json = dspex("signatures", "--json")
    # Then the table and the JSON both name qa with its fields and schemas
    assert table.returncode == 0, table.stderr
    assert "qa" in table.stdout and "question: str" in table.stdout and "list[str]" in table.stdout
    published = json.loads(as_json.stdout)
    assert {"qa", "classify", "summarize", "complex_analysis"} <= set(published)
    assert published["qa"]["input_schema"]["required"] == ["question"]


def test_submit_waits_and_prints_outputs(dspex: Dspex) -> None:
    result = dspex("submit", "qa", "--input", "question=hi", "--wait")
    assert result.returncode == 0, result.stderr
    assert "answer" in result.stdout and "confidence" in result.stdout
    assert "program qa v0" in result.stdout
    assert result.stderr.startswith("job ")


def test_submit_parses_json_values_and_no_wait_prints_the_job_id(dspex: Dspex) -> None:
    # max_words=30 must arrive as an integer, question=42 as the string "42" (the schema says string)
    summarize = dspex("submit", "summarize", "-i", "text=A long text about Redis.", "-i", "max_words=30")
    number_as_text = dspex("submit", "qa", "-i", "question=42", "--no-wait")
    assert summarize.returncode == 0, summarize.stderr
    assert "key_points" in summarize.stdout
    assert number_as_text.returncode == 0, number_as_text.stderr
    assert len(number_as_text.stdout.strip()) == 36  # a task id, alone on stdout


def test_bad_input_exits_2_and_names_the_field(dspex: Dspex) -> None:
    wrong_type = dspex("submit", "summarize", "--input", "text=hi", "--input", "max_words=many")
    missing = dspex("submit", "qa", "--input", "q=hi")
    bad_session = dspex("submit", "qa", "--input", "question=hi", "--session", "no spaces")
    assert wrong_type.returncode == 2
    assert "ValidationError" in wrong_type.stderr and "max_words" in wrong_type.stderr
    assert missing.returncode == 2 and "question" in missing.stderr and "Traceback" not in missing.stderr
    assert bad_session.returncode == 2 and "InvalidSession" in bad_session.stderr


def test_unknown_signature_exits_1_with_the_published_names(dspex: Dspex) -> None:
    result = dspex("submit", "nope", "--input", "x=1")
    assert result.returncode == 1
    assert "unknown signature 'nope'" in result.stderr and "qa" in result.stderr


def test_submit_follow_streams_tokens_then_prints_the_result(dspex: Dspex) -> None:
    # Given a prediction submitted with --follow (and a time bound of its own)
    result = dspex("submit", "qa", "--input", "question=What is DSPy?", "--follow", "--timeout-s", "30")
    # Then its live events come on stderr while it runs: steps as lines, the answer's tokens after its name
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("job ") and "running" in lines[1]
    assert any(line.startswith("start predictor") for line in lines)
    streamed = next(line for line in lines if line.startswith("answer: ")).removeprefix("answer: ")
    # and the result on stdout, as without --follow, holds the streamed answer
    assert streamed and streamed in result.stdout
    assert "confidence" in result.stdout and "program qa v0" in result.stdout


def test_submit_follow_of_a_job_out_of_time_exits_1_with_its_error(dspex: Dspex) -> None:
    result = dspex("submit", "qa", "--input", "question=Too late?", "--follow", "--timeout-s", "0.001")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "error: Cancelled:" in result.stderr and "timeout_s" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert dspex("submit", "qa", "-i", "question=x", "--follow", "--no-wait").returncode == 2


def test_cancel_stops_a_queued_job(dspex: Dspex, cli_target: CliTarget) -> None:
    from dspex_tasks import errors
    from dspex_tasks.client import Client
    from dspex_tasks.settings import Settings

    client = Client(settings=Settings(redis_url=cli_target.redis_url, namespace=cli_target.namespace,
                                      predict_queue=cli_target.queue))
    try:
        # Given a job queued for a moment
        job = client.submit("qa", {"question": "Later?"}, countdown=2)
        # When it is cancelled from the command line
        result = dspex("cancel", job.id)
        assert result.returncode == 0, result.stderr
        assert f"cancelled job {job.id}" in result.stdout
        # Then it ends as Cancelled, and cancelling it again says it had already finished
        with pytest.raises(errors.Cancelled, match="cancelled from the command line"):
            job.get(timeout=20)
        again = dspex("cancel", job.id, "--json")
        assert again.returncode == 0 and json.loads(again.stdout) == {"id": job.id, "cancelled": False}
        assert dspex("cancel", "not a job id").returncode == 2
    finally:
        client.close()


def test_programs_put_ls_show_history_rollback_rm(dspex: Dspex, tmp_path: Path) -> None:
    v1 = {"demos": [{"question": "What is 2+2?", "answer": "4", "confidence": 0.9}]}
    v2 = {"demos": [*v1["demos"], {"question": "Capital of France?", "answer": "Paris", "confidence": 0.95}],
          "instructions": "Answer briefly."}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    (tmp_path / "v2.json").write_text(json.dumps(v2))
    # Given two stored versions
    assert "v1" in dspex("programs", "put", "acme", "qa", str(tmp_path / "v1.json")).stdout
    put2 = dspex("programs", "put", "acme", "qa", str(tmp_path / "v2.json"), "--signature", "qa")
    assert put2.returncode == 0 and "v2" in put2.stdout
    # Then ls, show and history describe them
    ls = dspex("programs", "ls", "acme")
    assert ls.returncode == 0 and "qa" in ls.stdout
    assert json.loads(dspex("programs", "show", "acme", "qa").stdout) == v2
    assert json.loads(dspex("programs", "show", "acme", "qa", "--version", "1").stdout) == v1
    history = dspex("programs", "history", "acme", "qa")
    assert history.returncode == 0 and "1" in history.stdout and "2" in history.stdout
    # When rolled back, the worker serves v1 again
    rollback = dspex("programs", "rollback", "acme", "qa", "1")
    assert rollback.returncode == 0 and "v1" in rollback.stdout
    assert json.loads(dspex("programs", "show", "acme", "qa").stdout) == v1
    served = dspex("submit", "qa", "-i", "question=hi", "--session", "acme")
    assert "program qa v1" in served.stdout, served.stdout + served.stderr
    # When removed, it is gone, and removing it again fails clearly
    assert dspex("programs", "rm", "acme", "qa").returncode == 0
    assert "qa" not in dspex("programs", "ls", "acme").stdout
    again = dspex("programs", "rm", "acme", "qa")
    assert again.returncode == 1 and "ProgramNotFound" in again.stderr
    assert dspex("programs", "rollback", "acme", "qa", "7").returncode == 1


def test_programs_put_rejects_bad_files(dspex: Dspex, tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    assert dspex("programs", "put", "acme", "qa", str(tmp_path / "bad.json")).returncode == 2
    assert dspex("programs", "put", "acme", "qa", str(tmp_path / "list.json")).returncode == 2
    assert dspex("programs", "put", "acme", "qa", str(tmp_path / "missing.json")).returncode == 2
    unknown = dspex("programs", "put", "acme", "mine", "-", "--signature", "nope", stdin="{}")
    assert unknown.returncode == 1 and "nope" in unknown.stderr


def test_sessions_ls_and_rm(dspex: Dspex) -> None:
    assert dspex("programs", "put", "globex", "classify", "-", stdin='{"demos": []}').returncode == 0
    assert "globex" in dspex("sessions", "ls").stdout
    removed = dspex("sessions", "rm", "globex")
    assert removed.returncode == 0 and "globex" in removed.stdout
    assert "globex" not in dspex("sessions", "ls").stdout
    assert dspex("sessions", "rm", "globex").returncode == 1


def test_map_writes_every_result_in_input_order(dspex: Dspex, tmp_path: Path) -> None:
    questions = [f"Question number {i}?" for i in range(7)]
    forward, backward = tmp_path / "forward.jsonl", tmp_path / "backward.jsonl"
    forward.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    backward.write_text("\n".join(json.dumps({"question": q}) for q in reversed(questions)) + "\n\n")
    # When the same inputs are mapped in both orders with different chunkings
    first = dspex("map", "qa", str(forward), "--session", "mapped", "--chunk-size", "3", "--out",
                  str(tmp_path / "a.jsonl"))
    second = dspex("map", "qa", str(backward), "--chunk-size", "2", "--out", str(tmp_path / "b.jsonl"))
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "7 items" in first.stdout and "items/s" in first.stdout
    a = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    # Then there is one result per input, and (the mock LM being deterministic) each lines up with its input
    answers = [r["outputs"]["answer"] for r in a]
    assert len(a) == len(b) == 7 and len(set(answers)) == 7
    assert [r["outputs"]["answer"] for r in reversed(b)] == answers
    assert {r["session"] for r in a} == {"mapped"}


def test_map_rejects_a_bad_line_with_its_number(dspex: Dspex, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"question": "ok"}\nnot json\n')
    result = dspex("map", "qa", str(path))
    assert result.returncode == 2 and f"{path}:2" in result.stderr


def test_status_json_shows_the_worker_and_queues(dspex: Dspex, cli_target: CliTarget,
                                                 cli_worker: WorkerProcess) -> None:
    result = dspex("status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert len(status["workers"]) >= 1
    assert any(w["name"] == cli_worker.hostname and w["ok"] for w in status["workers"])
    assert status["queues"][cli_target.queue] == 0
    assert status["namespace"] == cli_target.namespace and "qa" in status["signatures"]
    table = dspex("status")
    assert table.returncode == 0 and cli_worker.hostname in table.stdout


def test_unreachable_redis_is_one_clear_line(dspex: Dspex) -> None:
    result = dspex("--redis-url", "redis://127.0.0.1:1/0", "sessions", "ls")
    assert result.returncode == 1
    assert "cannot reach Redis" in result.stderr and "Traceback" not in result.stderr


def test_mock_lm_serves_until_interrupted(cli_target: CliTarget) -> None:
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "dspex_tasks", "mock-lm", "--port", "0"], cwd=ROOT,
                            env=cli_target.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        url = line.split("listening on ", 1)[1].split()[0]
        with urllib.request.urlopen(f"{url}/models", timeout=5) as response:
            assert json.loads(response.read())["data"][0]["id"] == "mock"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_worker_processes_shut_down_warm_on_sigterm(cli_target: CliTarget) -> None:
    from dspex_tasks.client import Client
    from dspex_tasks.worker.procs import ping_names

    marker = f"DSPEX_TEST_MARKER=sup-{uuid.uuid4().hex}"
    node = f"sup{uuid.uuid4().hex[:6]}"
    # Given `dspex worker --processes 2` on a queue of its own
    proc = subprocess.Popen([sys.executable, "-m", "dspex_tasks", "worker", "--processes", "2", "-c", "2",
                             "-Q", f"{cli_target.namespace}.sup", "-n", f"{node}@%h", "-l", "WARNING"],
                            cwd=ROOT, env=cli_target.env(DSPEX_TEST_MARKER=marker.split("=", 1)[1]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = Client(redis_url=cli_target.redis_url, namespace=cli_target.namespace)
    try:
        def both_answer() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            return {f"{node}0", f"{node}1"} <= ping_names(client.app, timeout_s=0.3)

        wait_for(both_answer, timeout_s=45, interval_s=0.1, what="both supervised workers answer ping")
        children = [pid for pid, cmd in processes_with_env(marker) if "celery" in cmd]
        assert len(children) == 2
        # When it is asked to stop (a dying worker is covered in tests/unit/test_worker_procs.py)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        output = proc.stdout.read() if proc.stdout else ""
    finally:
        client.close()
        if proc.poll() is None:  # the test failed: still leave no workers behind
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            for pid in [proc.pid, *(pid for pid, _ in processes_with_env(marker))]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
    # Then both workers shut down cleanly and nothing is left
    assert code == 0, output
    assert "warm shutdown of 2 workers" in output and output.count("Warm shutdown") == 2
    assert wait_until_gone(marker) == []
