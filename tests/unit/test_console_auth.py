"""The web console's pure parts: the signed login cookie, the version diff, the job form from an input schema."""

from __future__ import annotations

import base64
import json

import pytest

from dspex_tasks.gateway.console.auth import CookieSigner, Login, LoginRequired, console_secret, narrowed
from dspex_tasks.gateway.console.diff import diff_states
from dspex_tasks.gateway.console.forms import form_fields, parse_inputs
from dspex_tasks.gateway.scopes import Right, Scopes
from dspex_tasks.settings import Settings

pytestmark = pytest.mark.unit

LOGIN = Login("0a1b2c3d", 1700000000.25, ("read", "write"), 2_000_000_000)


def test_a_signed_cookie_round_trips_and_holds_no_key() -> None:
    signer = CookieSigner(b"k" * 32)
    value = signer.sign(LOGIN)
    assert signer.verify(value, now=1_900_000_000) == LOGIN
    version, payload, _ = value.split(".")
    assert version == "v1"
    assert json.loads(base64.urlsafe_b64decode(payload + "==")) == {"k": "0a1b2c3d", "c": 1700000000.25,
                                                                    "r": ["read", "write"], "exp": 2_000_000_000}


@pytest.mark.parametrize("what", ["other secret", "tampered payload", "tampered mac", "expired", "malformed",
                                  "empty", "bad base64"])
def test_a_forged_tampered_or_expired_cookie_is_refused(what: str) -> None:
    signer = CookieSigner(b"k" * 32)
    good = signer.sign(LOGIN)
    version, payload, mac = good.split(".")
    raised = base64.urlsafe_b64encode(json.dumps({"k": "0a1b2c3d", "c": 1700000000.25, "r": ["admin"],
                                                  "exp": 2_000_000_000}).encode()).rstrip(b"=").decode()
    value = {"other secret": CookieSigner(b"x" * 32).sign(LOGIN), "tampered payload": f"{version}.{raised}.{mac}",
             "tampered mac": f"{version}.{payload}.{mac[::-1]}", "malformed": "v1.only-two",
             "expired": signer.sign(Login(LOGIN.key_id, LOGIN.created_at, LOGIN.rights, 1_000)), "empty": "",
             "bad base64": f"v1.!!!.{signer._mac('v1.!!!')}"}[what]
    with pytest.raises(LoginRequired):
        signer.verify(value, now=1_900_000_000)


def test_the_secret_comes_from_settings_else_is_random_per_process() -> None:
    a, configured = console_secret(Settings(console_secret="s" * 20))
    assert configured and a == console_secret(Settings(console_secret="s" * 20))[0]
    b, configured = console_secret(Settings())
    assert not configured and b != console_secret(Settings())[0] and len(b) == 32


def test_a_cookie_never_grants_more_than_it_was_issued_with() -> None:
    now = Scopes(frozenset({Right.READ, Right.WRITE}), ("team-a",))
    assert narrowed(now, ("read",)).rights == frozenset({Right.READ})  # a right granted since: not through it
    fewer = Scopes(frozenset({Right.READ}), ("team-a",))
    assert narrowed(fewer, ("read", "write")).rights == frozenset({Right.READ})  # one taken away: gone at once


def test_diff_marks_words_and_aligns_demos() -> None:
    a = {"demos": [{"q": "1"}, {"q": "gone"}], "instructions": "Answer the question."}
    b = {"self": {"demos": [{"q": "1"}, {"q": "new"}], "signature": {"instructions": "Answer the question. Be brief."}}}
    (d,) = diff_states(a, b)
    assert d.predictor == "self" and d.instructions_changed and d.demos_changed
    assert [(s.tag, s.text) for s in d.right_spans] == [("equal", "Answer the question."), ("added", "Be brief.")]
    assert [r.tag for r in d.demos] == ["equal", "removed", "added"]
    assert diff_states(a, a)[0].demos_changed is False


def test_diff_of_several_predictors_pairs_them_by_name() -> None:
    a = {"retrieve": {"demos": []}, "answer": {"demos": [{"x": 1}]}}
    b = {"retrieve": {"demos": []}, "answer": {"demos": [], "signature": {"instructions": "New."}}}
    diffs = {d.predictor: d for d in diff_states(a, b)}
    assert set(diffs) == {"retrieve", "answer"}
    assert not diffs["retrieve"].demos_changed and diffs["answer"].demos_changed
    assert diffs["answer"].instructions == (None, "New.")


SCHEMA = {"type": "object", "required": ["text", "n", "flag", "mode", "context"],
          "properties": {"text": {"type": "string"}, "n": {"type": "integer"}, "flag": {"type": "boolean"},
                         "mode": {"type": "string", "enum": ["a", "b"]},
                         "context": {"type": "array", "items": {"type": "string"}},
                         "opt": {"anyOf": [{"type": "number"}, {"type": "null"}]}}}


def test_the_job_form_follows_the_input_schema() -> None:
    fields = {f.name: (f.kind, f.required) for f in form_fields(SCHEMA)}
    assert fields == {"text": ("text", True), "n": ("integer", True), "flag": ("boolean", True),
                      "mode": ("enum", True), "context": ("json", True), "opt": ("number", False)}
    inputs, errors = parse_inputs(SCHEMA, {"in.text": "hi", "in.n": "3", "in.flag": "false", "in.mode": "b",
                                           "in.context": '["x"]', "in.opt": ""})
    assert errors == [] and inputs == {"text": "hi", "n": 3, "flag": False, "mode": "b", "context": ["x"]}
    _, errors = parse_inputs(SCHEMA, {"in.text": "", "in.n": "three", "in.flag": "", "in.mode": "a",
                                      "in.context": "[oops"})
    assert {e["field"] for e in errors} == {"n", "flag", "context"}


def test_every_template_and_static_file_ships_in_the_wheel() -> None:
    """pyproject's package-data for the console matches every file the console serves (the wheel has them)."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    console = root / "dspex_tasks" / "gateway" / "console"
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "dspex_tasks.gateway.console"]
    files = [p.relative_to(console).as_posix() for folder in ("templates", "static") for p in (console / folder).iterdir()]
    assert len(files) > 20 and [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)] == []
