"""The built wheel, installed in a fresh virtualenv, serving a user's own project outside the repo (issue 17 item 1).

The wheel is built from this checkout (``pip wheel --no-deps``) and installed with ``--no-deps`` into a new venv
whose only other path is the test venv's site-packages (a ``.pth`` line), so the dependencies need no download and
the package under test is the wheel's copy: the checkout is on no path, and the test venv's own editable hook for
``dspex_tasks`` is never loaded (``.pth`` files of a directory added by a ``.pth`` line are not processed).

The user project has its own ``signatures`` package (a program named ``shout``): ``dspex worker`` and
``celery -A dspex_tasks.worker.celery_app worker``, started in the project's directory, serve it and none of the
reference programs the wheel carries (``dspex_tasks.examples``); ``dspex flower`` starts with the packaged config.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dspex_tasks.client import Client
from dspex_tasks.settings import Settings
from tests._procs import ROOT, wait_for

pytestmark = pytest.mark.system

PROGRAM = '''"""A user's own program, in the project's own signatures package."""
import dspy

from dspex_tasks import program


@program("shout", interface="text: str -> loud: str")
class Shout(dspy.Module):
    def forward(self, text):
        return dspy.Prediction(loud=text.upper() + "!")
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with the wheel installed; yields its bin directory."""
    base = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(base / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next((base / "dist").glob("dspex_tasks-*.whl"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                   "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    names = {p.name for p in purelib.iterdir()}
    # only dspex_tasks: no top-level signatures or workers to shadow a project's own
    assert "dspex_tasks" in names and not {"signatures", "workers", "flower_config.py"} & names, sorted(names)
    assert (purelib / "dspex_tasks" / "examples" / "programs" / "data" / "corpus.jsonl").is_file()
    yield venv / "bin"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "signatures").mkdir()
    (tmp_path / "signatures" / "__init__.py").write_text(PROGRAM)
    return tmp_path


def _env(redis_url: str, namespace: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSPEX_", "PYTHON", "FLOWER_"))}
    env.update({"DSPEX_REDIS_URL": redis_url, "DSPEX_NAMESPACE": namespace, "DSPEX_LM": "mock",
                "DSPEX_SIGNATURE_MODULES": "signatures", "PYTHONUNBUFFERED": "1"})
    return env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.parametrize("route", ["dspex", "celery"])
def test_a_project_outside_the_repo_serves_its_own_program(installed: Path, project: Path, redis_url: str,
                                                           namespace: str, route: str) -> None:
    cmd = ([str(installed / "dspex"), "worker", "-c", "4"] if route == "dspex" else
           [str(installed / "python"), "-m", "celery", "-A", "dspex_tasks.worker.celery_app", "worker", "-P", "threads",
            "-c", "4"])  # the venv's celery (its console script lives with the dependencies, in the test venv)
    log = project / f"{route}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=project, env=_env(redis_url, namespace), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    client = Client(settings=Settings(redis_url=redis_url, namespace=namespace))
    try:
        published = wait_for(lambda: proc.poll() is None and client.signatures(refresh=True), timeout_s=60,
                             what=f"{route} worker published") or {}
        assert proc.poll() is None, log.read_text()[-3000:]
        # the project's own program, and none of the reference programs the wheel carries
        assert set(published) == {"shout"}, sorted(published)
        result = client.submit("shout", {"text": "outside the repo"}).get(timeout=30)
        assert result.outputs == {"loud": "OUTSIDE THE REPO!"}
    finally:
        client.close()
        _stop(proc)


def test_dspex_flower_starts_with_the_packaged_config(installed: Path, project: Path, redis_url: str,
                                                      namespace: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**_env(redis_url, namespace), "FLOWER_BASIC_AUTH": "ops:secret-pw", "DSPEX_FLOWER_DB": str(project / "f.db")}
    log = project / "flower.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(installed / "dspex"), "flower", "--port", str(port)], cwd=project, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        auth = {"Authorization": "Basic " + base64.b64encode(b"ops:secret-pw").decode()}

        def answers(path: str, headers: dict[str, str]) -> int:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
                return int(urllib.request.urlopen(req, timeout=3).status)
            except urllib.error.HTTPError as exc:
                return int(exc.code)
            except OSError:
                return 0

        wait_for(lambda: proc.poll() is None and answers("/healthcheck", {}) == 200, timeout_s=60,
                 what="flower answers")
        text = log.read_text(errors="replace")
        assert "observability/flower_config.py" in text, text[-2000:]  # the packaged config, by default
        # and it applies it: authentication is enforced
        assert answers("/api/workers", {}) == 401 and answers("/api/workers", auth) == 200
    finally:
        _stop(proc)
    assert shutil.which("dspex", path=str(installed))
