"""The pytest plugin as a user's project gets it (issue 17 item 2): a temporary project with its own programs and
tests, run by pytest in a subprocess (pytester), with nothing but the installed package's entry point."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.redis

PROGRAMS = '''
import dspy

from dspex_tasks import program, signature

helpdesk = signature("question: str -> answer: str", name="helpdesk", instructions="Answer the customer.")


@program("triage", interface="ticket: str -> team: str, urgent: bool")
class Triage(dspy.Module):
    def __init__(self):
        super().__init__()
        self.classify = dspy.Predict("ticket -> team: str, urgent: bool")

    def forward(self, ticket):
        return self.classify(ticket=ticket)
'''

TESTS = '''
import myproj.programs  # registers the project's programs, as the project's own code does

SEEN = set()


def test_scripted_answer_through_the_in_process_worker(dspex_mock, dspex_client):
    dspex_mock.script("helpdesk", {"answer": "Reset it from the settings page."})
    result = dspex_client.submit("helpdesk", {"question": "How do I reset my password?"}).get(timeout=30)
    assert result.outputs == {"answer": "Reset it from the settings page."}


def test_a_callable_script_sees_the_inputs(dspex_mock, dspex_client):
    dspex_mock.script("*", lambda inputs: {"team": "billing" if "invoice" in inputs["ticket"] else "it",
                                           "urgent": True})
    out = dspex_client.submit("triage", {"ticket": "my invoice is wrong"}).get(timeout=30).outputs
    assert out == {"team": "billing", "urgent": True}


def test_each_test_has_its_own_namespace_and_database(settings, redis_client):
    assert settings.namespace not in SEEN and redis_client.dbsize() == 0
    SEEN.add(settings.namespace)
    redis_client.set(settings.namespace + ":x", 1)


def test_each_test_has_its_own_namespace_and_database_again(settings, redis_client):
    assert settings.namespace not in SEEN and redis_client.dbsize() == 0


def test_a_real_worker_process_over_the_http_mock(dspex_worker_process, dspex_mock_server, redis_url, namespace):
    from dspex_tasks import Client
    from dspex_tasks.settings import Settings

    worker = dspex_worker_process("myproj.programs")
    client = Client(settings=Settings(redis_url=redis_url, namespace=namespace))
    try:
        assert {"helpdesk", "triage"} <= set(client.signatures())
        out = client.submit("triage", {"ticket": "server down"}).get(timeout=30).outputs
        assert isinstance(out["team"], str) and isinstance(out["urgent"], bool)
        assert dspex_mock_server.stats()["requests"] >= 1  # the real dspy -> LiteLLM -> HTTP path
    finally:
        client.close()
    assert worker.proc.poll() is None
'''


def test_a_user_project_tests_its_programs_with_the_plugin(pytester: Any) -> None:
    pytester.makepyfile(**{"myproj/__init__.py": "", "myproj/programs.py": PROGRAMS, "tests/test_myproj.py": TESTS})
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider\n")
    result = pytester.runpytest_subprocess("-q", "tests", timeout=240)
    result.assert_outcomes(passed=5)
    assert "dspex" in str(pytester.runpytest_subprocess("--trace-config", "-q", "--co", "tests").stdout)


def test_the_plugin_turns_off(pytester: Any) -> None:
    pytester.makepyfile(test_off="def test_needs_it(dspex_client):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:dspex", "-q", timeout=120)
    result.assert_outcomes(errors=1)
    assert "fixture 'dspex_client' not found" in str(result.stdout)
