"""Layer 3: ``dspex optimize``, ``datasets``, ``runs`` and ``schedule`` as real processes against a real worker.

The worker consumes both its predict and optimize queues and answers with the ``learns_from_demos``
mock LM, so a run's candidate (with demos) beats its baseline and is promoted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dspex_tasks.testing.mockgen import rule_answer
from tests._procs import ROOT, wait_for
from tests.system._cli import CliTarget, Dspex

pytestmark = [pytest.mark.system, pytest.mark.usefixtures("opt_worker")]

STAGES = ("load", "baseline", "compile", "candidate")


def labelled(n: int, prefix: str = "question") -> list[dict[str, Any]]:
    return [{"question": f"{prefix} {i}", "answer": rule_answer({"question": f"{prefix} {i}"})} for i in range(n)]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dataset_optimize_follow_then_inspect_and_plot(dspex_opt: Dspex, tmp_path: Path) -> None:
    # Given a stored dataset whose labels the mock LM learns from demos
    put = dspex_opt("datasets", "put", "qa-train", str(write_jsonl(tmp_path / "train.jsonl", labelled(16))))
    assert put.returncode == 0, put.stderr
    assert "16 rows" in put.stdout
    listed = dspex_opt("datasets", "ls")
    assert listed.returncode == 0 and "qa-train" in listed.stdout and "16" in listed.stdout
    shown = dspex_opt("datasets", "show", "qa-train", "--limit", "2")
    assert shown.returncode == 0, shown.stderr
    assert [json.loads(line) for line in shown.stdout.splitlines()] == labelled(2)

    # When a run is started on it and followed
    run = dspex_opt("optimize", "qa", "--dataset", "qa-train", "--session", "s1", "--follow",
                    "--param", "eval_chunk_size=4", "--param", "max_bootstrapped_demos=2", "--timeout", "60")

    # Then it exits 0 after showing every stage, the scores, and a summary saying it was promoted
    assert run.returncode == 0, run.stdout + run.stderr
    for stage in STAGES:
        assert stage in run.stderr, run.stderr
    assert "best score" in run.stderr and "LM calls" in run.stderr
    assert "promoted" in run.stdout and "yes" in run.stdout
    assert "baseline_score" in run.stdout and "program_version" in run.stdout and "beat baseline" in run.stdout

    # And runs ls lists it, runs show --json carries its summary and events, runs plot draws it
    as_json = dspex_opt("runs", "ls", "--session", "s1", "--json")
    assert as_json.returncode == 0, as_json.stderr
    records = json.loads(as_json.stdout)
    assert len(records) == 1 and records[0]["status"] == "succeeded" and records[0]["dataset"] == "qa-train"
    run_id = records[0]["run_id"]
    assert records[0]["params"] == {"eval_chunk_size": 4, "max_bootstrapped_demos": 2}  # k=v parsed as JSON
    table = dspex_opt("runs", "ls", "--session", "s1")
    assert table.returncode == 0 and run_id in table.stdout and "succeeded" in table.stdout
    assert run_id in run.stderr

    show = dspex_opt("runs", "show", run_id, "--json")
    assert show.returncode == 0, show.stderr
    detail = json.loads(show.stdout)
    summary = detail["summary"]
    assert summary["promoted"] is True and summary["score"] > summary["baseline_score"]
    assert summary["program_version"] == 1 and summary["lm_calls"] > 0
    assert [e["stage"] for e in detail["events"]][-1] == "done"
    assert set(STAGES) <= {e["stage"] for e in detail["events"]}
    text = dspex_opt("runs", "show", run_id)
    assert text.returncode == 0 and "events" in text.stdout and "candidate" in text.stdout

    plot = dspex_opt("runs", "plot", run_id, "--out", "tmp/x.png", cwd=tmp_path)
    assert plot.returncode == 0, plot.stderr
    png = (tmp_path / "tmp" / "x.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # A finished run cannot be cancelled; an unknown one is reported
    cancel = dspex_opt("runs", "cancel", run_id)
    assert cancel.returncode == 1 and "already succeeded" in cancel.stderr
    missing = dspex_opt("runs", "show", "0" * 32)
    assert missing.returncode == 1 and "no optimization run" in missing.stderr


def test_bad_rows_and_files_exit_2_naming_the_problem(dspex_opt: Dspex, tmp_path: Path) -> None:
    # a row whose question is a number: reported by index and field, before anything runs
    rows: list[Any] = labelled(5)
    rows[3] = {"question": 7, "answer": "x"}
    bad_row = dspex_opt("optimize", "qa", "--trainset", str(write_jsonl(tmp_path / "bad.jsonl", rows)),
                        "--session", "s2")
    assert bad_row.returncode == 2, bad_row.stderr
    assert "trainset.3.question" in bad_row.stderr and "Traceback" not in bad_row.stderr
    # a line that is not JSON, in optimize and in datasets put: file:line
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(labelled(1)[0]) + "\n{not json\n")
    for args in (("optimize", "qa", "--trainset", str(broken)), ("datasets", "put", "broken", str(broken))):
        res = dspex_opt(*args)
        assert res.returncode == 2 and f"{broken}:2" in res.stderr, res.stderr
    # neither or both of --trainset/--dataset, a bad --param, an unknown optimizer
    good = str(write_jsonl(tmp_path / "good.jsonl", labelled(4)))
    assert dspex_opt("optimize", "qa").returncode == 2
    assert dspex_opt("optimize", "qa", "--trainset", good, "--dataset", "d").returncode == 2
    assert dspex_opt("optimize", "qa", "--trainset", good, "--param", "novalue").returncode == 2
    unknown = dspex_opt("optimize", "qa", "--trainset", good, "--optimizer", "nope")
    assert unknown.returncode == 2 and "unknown optimizer" in unknown.stderr
    assert dspex_opt("datasets", "show", "never-stored").returncode == 1
    assert json.loads(dspex_opt("runs", "ls", "--session", "s2", "--json").stdout) == []


def test_no_follow_prints_the_run_id_and_a_failed_run_exits_1(dspex_opt: Dspex, opt_target: CliTarget,
                                                               tmp_path: Path) -> None:
    import redis

    from dspex_tasks import keys

    train = str(write_jsonl(tmp_path / "t.jsonl", labelled(6)))
    # params the optimizer refuses: exit 2 naming the field, before anything runs
    refused = dspex_opt("optimize", "qa", "--trainset", train, "--session", "s3", "--no-follow",
                        "--params", '{"max_bootstrapped_demos": "many"}')
    assert refused.returncode == 2 and "params.max_bootstrapped_demos" in refused.stderr, refused.stderr
    typo = dspex_opt("optimize", "qa", "--trainset", train, "--session", "s3", "--param", "max_bootstraped_demos=2")
    assert typo.returncode == 2 and "did you mean 'max_bootstrapped_demos'?" in typo.stderr, typo.stderr
    assert json.loads(dspex_opt("runs", "ls", "--session", "s3", "--json").stdout) == []
    # workers that publish no params schemas (older ones): a built-in optimizer's own model still refuses them
    r = redis.Redis.from_url(opt_target.redis_url)
    caps = keys.capabilities(opt_target.namespace)
    saved = r.hget(caps, "optimizer_params")
    r.hdel(caps, "optimizer_params")
    try:
        again = dspex_opt("optimize", "qa", "--trainset", train, "--session", "s3", "--no-follow",
                          "--params", '{"max_bootstrapped_demos": "many"}')
        assert again.returncode == 2 and "params.max_bootstrapped_demos" in again.stderr, again.stderr
    finally:
        if saved is not None:
            r.hset(caps, "optimizer_params", saved)
        r.close()
    # a run that fails on the worker (one row cannot be split into train and validation): --no-follow prints
    # its id and exits 0; following it exits 1 naming the reason
    one = str(write_jsonl(tmp_path / "one.jsonl", labelled(1)))
    started = dspex_opt("optimize", "qa", "--trainset", one, "--session", "s3", "--no-follow")
    assert started.returncode == 0, started.stderr
    assert len(started.stdout.strip()) == 32
    followed = dspex_opt("optimize", "qa", "--trainset", one, "--session", "s3", "--timeout", "30")
    assert followed.returncode == 1, followed.stdout + followed.stderr
    assert "failed" in followed.stderr and "need at least 2 rows" in followed.stderr


def test_dry_run_without_session_prints_its_candidate(dspex_opt: Dspex, tmp_path: Path) -> None:
    train = str(write_jsonl(tmp_path / "t.jsonl", labelled(12)))
    run = dspex_opt("optimize", "qa", "--trainset", train, "--param", "eval_chunk_size=4", "--timeout", "60")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "dry run (no session)" in run.stdout
    run_id = json.loads(dspex_opt("runs", "ls", "--json").stdout)[0]["run_id"]
    table = dspex_opt("runs", "ls")
    assert table.returncode == 0 and "dry run" in table.stdout and run_id in table.stdout
    cand = dspex_opt("runs", "show", run_id, "--candidate")
    assert cand.returncode == 0, cand.stderr
    assert isinstance(json.loads(cand.stdout), dict)
    put = dspex_opt("programs", "put", "dry1", "qa", "-", stdin=cand.stdout)
    assert put.returncode == 0, put.stderr


def test_schedule_add_ls_rm_round_trip(dspex_opt: Dspex) -> None:
    # Given two schedules: one naming its signature, one whose NAME is the signature
    nightly = dspex_opt("schedule", "add", "nightly", "--signature", "qa", "--cron", "0 3 * * *",
                        "--dataset", "qa-train", "--session", "s1", "--param", "eval_chunk_size=4")
    hourly = dspex_opt("schedule", "add", "qa", "--every", "3600", "--dataset", "qa-train", "--session", "s1",
                       "--optimizer", "bootstrap_few_shot_with_random_search")
    assert nightly.returncode == 0, nightly.stderr
    assert hourly.returncode == 0, hourly.stderr
    # When they are listed
    entries = {e["name"]: e for e in json.loads(dspex_opt("schedule", "ls", "--json").stdout)}
    table = dspex_opt("schedule", "ls")
    # Then both are there with what each run will do
    assert set(entries) == {"nightly", "qa"}
    assert entries["nightly"]["kwargs"]["signature"] == "qa"
    assert entries["nightly"]["kwargs"]["params"] == {"eval_chunk_size": 4}
    assert "0 3" in entries["nightly"]["schedule"]
    assert entries["qa"]["kwargs"]["signature"] == "qa"
    assert entries["qa"]["kwargs"]["optimizer"] == "bootstrap_few_shot_with_random_search"
    assert table.returncode == 0 and "nightly" in table.stdout and "qa-train" in table.stdout
    # Bad schedules are refused
    unknown_sig = dspex_opt("schedule", "add", "weekly", "--cron", "0 3 * * 0", "--dataset", "qa-train",
                            "--session", "s1")
    assert unknown_sig.returncode == 1 and "--signature" in unknown_sig.stderr
    bad_cron = dspex_opt("schedule", "add", "qa", "--cron", "0 3 *", "--dataset", "d", "--session", "s1")
    assert bad_cron.returncode == 2 and "cron" in bad_cron.stderr
    both = dspex_opt("schedule", "add", "qa", "--cron", "0 3 * * *", "--every", "60", "--dataset", "d",
                     "--session", "s1")
    assert both.returncode == 2
    # And removing them leaves none
    assert dspex_opt("schedule", "rm", "nightly").returncode == 0
    assert dspex_opt("schedule", "rm", "qa").returncode == 0
    assert dspex_opt("schedule", "rm", "qa").returncode == 1
    assert json.loads(dspex_opt("schedule", "ls", "--json").stdout) == []


def test_beat_starts_a_scheduled_run(dspex_opt: Dspex, opt_target: CliTarget, tmp_path: Path) -> None:
    # Given a dataset and a schedule due every second
    assert dspex_opt("datasets", "put", "beat-train", str(write_jsonl(tmp_path / "b.jsonl", labelled(8)))).returncode == 0
    added = dspex_opt("schedule", "add", "beat-qa", "--signature", "qa", "--every", "1", "--dataset", "beat-train",
                      "--session", "beat", "--param", "eval_chunk_size=4")
    assert added.returncode == 0, added.stderr
    # When dspex beat runs for a while
    env = opt_target.env(DSPEX_OPTIMIZE_QUEUE=f"{opt_target.namespace}.optimize")
    log = tmp_path / "beat.log"
    with log.open("wb") as out:
        beat = subprocess.Popen([sys.executable, "-m", "dspex_tasks", "beat", "--loglevel", "INFO"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # Then it starts scheduled runs on the worker, which finish like manual ones
            def finished() -> list[dict[str, Any]]:
                res = dspex_opt("runs", "ls", "--session", "beat", "--json")
                return [r for r in json.loads(res.stdout or "[]") if r["status"] == "succeeded"]

            runs = wait_for(finished, timeout_s=30, interval_s=0.5, what="a scheduled run that succeeded")
        finally:
            os.killpg(beat.pid, signal.SIGTERM)
            try:
                beat.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(beat.pid, signal.SIGKILL)
                beat.wait(5)
    assert runs[0]["scheduled"] is True and runs[0]["schedule"] == "beat-qa" and runs[0]["dataset"] == "beat-train"
    assert "Sending due task beat-qa" in log.read_text(errors="replace")
    assert dspex_opt("schedule", "rm", "beat-qa").returncode == 0


def run_id_of(res: subprocess.CompletedProcess[str]) -> str:
    """The run id a followed ``dspex optimize`` announces on stderr."""
    import re

    found = re.search(r"run ([0-9a-f]{32})", res.stderr)
    assert found, res.stderr
    return found.group(1)


def test_runs_show_lists_each_predictors_changes(dspex_opt: Dspex, tmp_path: Path) -> None:
    # Given a run on a session without a program yet: it starts from the program's defaults
    train = str(write_jsonl(tmp_path / "t.jsonl", labelled(8)))
    run = dspex_opt("optimize", "qa", "--trainset", train, "--session", "chg", "--timeout", "30",
                    "--param", "max_bootstrapped_demos=2", "--param", "max_labeled_demos=3")
    assert run.returncode == 0, run.stdout + run.stderr
    run_id = run_id_of(run)
    # When it is shown
    detail = json.loads(dspex_opt("runs", "show", run_id, "--json").stdout)
    text = dspex_opt("runs", "show", run_id)
    # Then its one predictor went from no demos to its candidate's, under the signature's own instructions
    demos = len(json.loads(dspex_opt("runs", "show", run_id, "--candidate").stdout)["demos"])
    [change] = detail["changes"]
    assert demos > 0 and change["predictor"] == "self" and change["demos"] == [0, demos], change
    # no baseline state: "before" is the published signature's default, which bootstrapping keeps
    said = change["instructions"]
    assert said[0] and said[0] == said[1] and change["instructions_changed"] is False, change
    assert text.returncode == 0, text.stderr
    assert "changes: baseline → candidate (1 predictor)" in text.stdout and f"0 → {demos}" in text.stdout
    assert f"unchanged: {said[1][:20]}" in text.stdout
    assert "95% interval" in text.stdout and "reported" in text.stdout  # the summary's gain row


def test_runs_compare_puts_runs_side_by_side(dspex_opt: Dspex, tmp_path: Path) -> None:
    # Given two runs on one tiny valset where the candidate wins 1 of 3: one requires a 95% interval
    train = str(write_jsonl(tmp_path / "t.jsonl", labelled(8)))
    val = str(write_jsonl(tmp_path / "v.jsonl", labelled(1, "val") + [
        {"question": f"hard {i}", "answer": f"unreachable-{i}"} for i in range(2)]))
    ids = []
    for session, extra in (("cmp1", ["--param", "confidence=0.95"]), ("cmp2", [])):
        run = dspex_opt("optimize", "qa", "--trainset", train, "--valset", val, "--session", session,
                        "--param", "max_bootstrapped_demos=2", *extra, "--timeout", "30")
        assert run.returncode == 0, run.stdout + run.stderr
        ids.append(run_id_of(run))
    assert "+0.333 (95% interval [+0.000, +1.000] over 3 examples, reported)" in run.stdout, run.stdout

    # When they are compared
    table = dspex_opt("runs", "compare", *ids)
    as_json = dspex_opt("runs", "compare", *ids, "--json")

    # Then the table has one column per run with the scores, the gain and its interval, and the outcome
    assert table.returncode == 0, table.stderr
    lines = [line.replace("┃", "│").strip().strip("│") for line in table.stdout.splitlines()]
    cells = [[c.strip() for c in line.split("│")] for line in lines if "│" in line]
    rows_by_label = {row[0]: row[1:] for row in cells}
    assert rows_by_label[""] == ids, table.stdout  # the header: one column per run, in the order given
    assert rows_by_label["optimizer"] == ["bootstrap_few_shot"] * 2 and rows_by_label["metric"] == ["exact_match"] * 2
    assert rows_by_label["baseline"] == ["0.000"] * 2 and rows_by_label["candidate"] == ["0.333"] * 2
    assert rows_by_label["gain"] == ["+0.333"] * 2
    assert rows_by_label["gain interval"] == ["[+0.000, +1.000] at 95%, required", "[+0.000, +1.000] at 95%"]
    assert rows_by_label["promoted"] == ["no", "yes"] and rows_by_label["validation examples"] == ["3", "3"]
    assert all(int(n) > 0 for n in rows_by_label["LM calls"]) and all(d.endswith(" s") for d in rows_by_label["duration"])
    rows = json.loads(as_json.stdout)
    assert [r["run_id"] for r in rows] == ids and [r["promoted"] for r in rows] == [False, True]
    assert [r["confidence_required"] for r in rows] == [True, False] and rows[0]["gain_ci"] == [0.0, 1.0]

    # And an unknown run exits 2 naming it
    unknown = dspex_opt("runs", "compare", ids[0], "0" * 32)
    assert unknown.returncode == 2 and f"no optimization run '{'0' * 32}'" in unknown.stderr, unknown.stderr
    # And runs plot draws them side by side
    plot = dspex_opt("runs", "plot", *ids, "--out", "cmp.png", cwd=tmp_path)
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
