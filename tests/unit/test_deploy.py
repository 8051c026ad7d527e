"""Layer 1: deploy/ checked statically (no Docker engine, no cluster).

The Dockerfile is read with a small parser, docker-compose.yml is validated against the Compose
Specification's JSON Schema (vendored in tests/data) after Compose-style interpolation, and the
Kubernetes manifests are cross-checked with each other. Every command line they run is parsed by the
real ``dspex`` CLI, every ``DSPEX_*`` value goes through ``Settings``, and the worker, health and Flower
invocations are compared with the ones the system tests run. The KEDA triggers are derived from the real Celery
transport configuration, and deploy/constraints.txt is checked against pyproject.toml.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer.main
import yaml
from typer.testing import CliRunner

from dspex_tasks import cli
from dspex_tasks.cli import ops as cli_ops
from dspex_tasks.settings import Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
NAMESPACE = "dspex"
IMAGE_UID = 10001
# The extras the image installs: Flower, and the HTTP gateway's FastAPI and uvicorn.
IMAGE_EXTRAS = "flower,gateway"

# Compose refuses to start without these; the tests supply them.
COMPOSE_ENV = {"REDIS_PASSWORD": "test-password", "FLOWER_BASIC_AUTH": "admin:test-secret"}

# The worst case of one predict task: every attempt of an LM call times out.
DEFAULTS = Settings()
LONGEST_LM_CALL_S = DEFAULTS.lm_timeout_s * (DEFAULTS.lm_num_retries + 1)


# -- helpers: settings and the CLI --------------------------------------------------------------------------------

def _use_env(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str | None]) -> None:
    """Exactly these DSPEX_* variables (others removed); None leaves a variable unset."""
    for var in list(os.environ):
        if var.startswith("DSPEX_") and not var.startswith("DSPEX_TEST_"):
            monkeypatch.delenv(var)
    for key, value in env.items():
        if value is not None:
            monkeypatch.setenv(key, value)


def _settings_from(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str | None]) -> Settings:
    """Settings read from ``env`` as a worker would read them, after checking every DSPEX_* name is real."""
    known = {f"DSPEX_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(k for k in env if k.startswith("DSPEX_") and k not in known)
    assert not unknown, f"not DSPEX_* settings: {unknown}"
    _use_env(monkeypatch, env)
    return Settings()


def _parse_cli(argv: list[str]) -> dict[str, Any]:
    """Parse ``dspex <argv>`` with the real CLI (types, choices, unknown options) without running it."""
    group = typer.main.get_command(cli.app)
    root = group.make_context("dspex", [], resilient_parsing=True)
    name, *rest = argv
    command = group.get_command(root, name)
    assert command is not None, f"`dspex {name}` is not a command"
    ctx = command.make_context(name, list(rest), parent=root)
    return dict(ctx.params)


class _FakeCeleryApp:
    """Records what a CLI command asks of the app create_worker_app() returns, instead of running it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def worker_main(self, argv: list[str]) -> None:
        self.calls.append(("worker_main", list(argv)))

    def start(self, argv: list[str]) -> None:
        self.calls.append(("start", list(argv)))


def _run_cli(monkeypatch: pytest.MonkeyPatch, argv: list[str], env: Mapping[str, str | None]) -> list[tuple[str, list[str]]]:
    """Run ``dspex <argv>`` for real, up to the Celery app it would start."""
    from dspex_tasks.worker import app as app_module

    fake = _FakeCeleryApp()
    monkeypatch.setattr(app_module, "create_worker_app", lambda *args, **kwargs: fake)
    _use_env(monkeypatch, env)
    result = CliRunner().invoke(cli.app, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return fake.calls


# Celery worker options, short and long spellings, as the system tests and `dspex worker` write them.
_CELERY_OPTIONS = {"-Q": "queues", "--queues": "queues", "-P": "pool", "--pool": "pool", "-c": "concurrency",
                   "--concurrency": "concurrency", "-n": "hostname", "--hostname": "hostname",
                   "-l": "loglevel", "--loglevel": "loglevel", "-A": "app", "--app": "app"}


def _celery_options(argv: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    it = iter(argv)
    for arg in it:
        if arg in _CELERY_OPTIONS:
            opts[_CELERY_OPTIONS[arg]] = next(it)
        elif arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            opts[name] = value or "true"
    return opts


def _system_test_worker_argv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """The command line tests/_procs.WorkerProcess starts (captured, not run)."""
    from tests import _procs

    seen: list[list[str]] = []

    class _Popen:
        def __init__(self, cmd: list[str], **kwargs: Any) -> None:
            seen.append(list(cmd))

    monkeypatch.setattr(_procs.subprocess, "Popen", _Popen)
    proc = _procs.WorkerProcess("redis://127.0.0.1:1/0", "deploytest", log_dir=tmp_path)
    proc._log.close()
    return seen[0]


# -- helpers: the Dockerfile --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    heredocs: tuple[str, ...] = ()
    stage: str = ""


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined, comments dropped and heredoc bodies attached."""
    lines = text.splitlines()
    out: list[Instruction] = []
    stage = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [line.rstrip()]
        while parts[-1].endswith("\\") and i < len(lines):
            parts[-1] = parts[-1][:-1]
            nxt = lines[i]
            i += 1
            if not nxt.lstrip().startswith("#"):
                parts.append(nxt.rstrip())
        logical = " ".join(p.strip() for p in parts if p.strip())
        keyword, _, args = logical.partition(" ")
        bodies: list[str] = []
        for m in re.finditer(r"<<(-?)(['\"]?)([A-Za-z_]\w*)\2", args):
            body: list[str] = []
            while i < len(lines) and (lines[i].strip() if m.group(1) else lines[i]) != m.group(3):
                body.append(lines[i])
                i += 1
            i += 1  # the terminator
            bodies.append("\n".join(body))
        if keyword.upper() == "FROM":
            stage = args.split()[-1] if " as " in args.lower() else args.split()[0]
        out.append(Instruction(keyword.upper(), args.strip(), tuple(bodies), stage))
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile((DEPLOY / "Dockerfile").read_text())


def _only(instructions: list[Instruction], keyword: str, stage: str | None = None) -> list[Instruction]:
    return [ins for ins in instructions if ins.keyword == keyword and (stage is None or ins.stage == stage)]


def _runtime_stage(instructions: list[Instruction]) -> str:
    return _only(instructions, "FROM")[-1].stage


def _exec_form(ins: Instruction) -> list[str]:
    args = ins.args.split("CMD", 1)[1] if ins.keyword == "HEALTHCHECK" else ins.args
    value = json.loads(args.strip())
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{ins.keyword} is not exec form"
    return value


def _env_of(instructions: list[Instruction], stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in _only(instructions, "ENV", stage):
        for token in shlex.split(ins.args):
            key, sep, value = token.partition("=")
            assert sep, f"ENV {token}: use KEY=value"
            env[key] = value
    return env


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether a .dockerignore excludes ``path`` (last matching pattern wins; a pattern matches a parent too)."""

    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i:end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        rx = regex(raw.lstrip("!").strip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


# -- helpers: compose ---------------------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)")


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable interpolation over a parsed document: ${X}, ${X:-d}, ${X-d}, ${X:?e}, ${X?e}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        current = env.get(name)
        unset_or_empty = not current
        if op in (":-", "-") and (unset_or_empty if op == ":-" else current is None):
            return arg
        if op in (":?", "?") and (unset_or_empty if op == ":?" else current is None):
            raise MissingVariable(f"{name}: {arg}")
        return current or ""

    return _INTERPOLATION.sub(one, value)


def _compose_variables(value: Any) -> Iterator[tuple[str, str | None, str]]:
    """(name, operator, argument) of every ${...} in a parsed document."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _compose_variables(v)
    elif isinstance(value, list):
        for v in value:
            yield from _compose_variables(v)
    elif isinstance(value, str):
        for m in _INTERPOLATION.finditer(value):
            if m.group("name") or m.group("bare"):
                yield m.group("name") or m.group("bare"), m.group("op"), m.group("arg") or ""


@pytest.fixture(scope="module")
def compose_raw() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def compose(compose_raw: dict[str, Any]) -> dict[str, Any]:
    """The compose file as `docker compose config` would see it with only the required variables set."""
    doc = interpolate(compose_raw, COMPOSE_ENV)
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _dspex_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in doc["services"].items() if name != "redis"}


def _env_dict(svc: dict[str, Any]) -> dict[str, str | None]:
    env = svc.get("environment") or {}
    assert isinstance(env, dict), "use the mapping form of environment"
    return {k: None if v is None else str(v) for k, v in env.items()}


def _arg(argv: list[str], option: str) -> str:
    assert option in argv, f"{option} missing from {argv}"
    return argv[argv.index(option) + 1]


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(float(n) * units[u] for n, u in parts)


# -- helpers: Kubernetes ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert isinstance(doc, dict), path
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


def _of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    return dict(containers[0])


def _expand_k8s_env(container: dict[str, Any], config: Mapping[str, str],
                    secrets: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom, then env with $(VAR) from earlier entries."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config)
        else:
            env.update(secrets[source["secretRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            value = str(item["value"])
            for ref in re.findall(r"\$\((\w+)\)", value):
                assert ref in env, f"$({ref}) in {item['name']} must be defined before it"
                value = value.replace(f"$({ref})", env[ref])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            value = secrets[ref["name"]][ref["key"]]
        env[item["name"]] = value
    return env


def _pod_env(manifests: list[dict[str, Any]], deployment: str) -> dict[str, str]:
    """The environment of a Deployment's container, with the ConfigMap and the Secrets' placeholder values."""
    (config,) = _of_kind(manifests, "ConfigMap").values()
    secrets = {n: s["stringData"] for n, s in _of_kind(manifests, "Secret").items()}
    return _expand_k8s_env(_container(_of_kind(manifests, "Deployment")[deployment]), config["data"], secrets)


def _pod_settings(manifests: list[dict[str, Any]], deployment: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    env = _pod_env(manifests, deployment)
    return _settings_from(monkeypatch, {k: v for k, v in env.items() if k.startswith("DSPEX_")})


def _selects(selector: dict[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects ``labels``."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


@pytest.fixture(scope="module")
def monitoring() -> list[dict[str, Any]]:
    """The optional monitoring Component (deploy/k8s/monitoring): PodMonitors and the gateway key's Secret."""
    docs: list[dict[str, Any]] = []
    for path in sorted((K8S / "monitoring").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def _waiting_lists(settings: Settings, queue: str) -> set[str]:
    """Every Redis list a message sent to ``queue`` can wait in, from dspex's real broker transport configuration.

    kombu's Redis transport puts a message with a priority in ``<queue><sep><step>`` (the list named after the
    queue for step 0); the channel class, its separator and priority steps are the ones Celery gets from
    ``celery_config``. Every priority a message can carry (kombu clamps it to min..max) is tried.
    """
    from kombu.transport import resolve_transport

    from dspex_tasks.app import celery_config

    config = celery_config(settings)
    options = config["broker_transport_options"]
    transport = resolve_transport(config.get("broker_transport") or settings.broker.partition("://")[0])
    channel_cls = transport.Channel
    channel = channel_cls.__new__(channel_cls)  # no connection: only the naming rules are used
    for name in channel_cls.from_transport_options:
        if name in options:
            setattr(channel, name, options[name])
    prefix = getattr(channel, "global_keyprefix", "") or ""
    lists = {prefix + channel._q_for_pri(queue, p) for p in range(channel.min_priority, channel.max_priority + 1)}
    assert queue in lists
    return lists


# == Dockerfile ===================================================================================================

def test_dockerfile_is_multi_stage_on_python_slim(dockerfile: list[Instruction]) -> None:
    froms = _only(dockerfile, "FROM")
    assert [f.stage for f in froms] == ["builder", "runtime"]
    for f in froms:
        assert re.fullmatch(r"python:3\.11-slim AS \w+", f.args), f.args
    # The builder turns the project (and every dependency) into wheels ...
    wheel = [r for r in _only(dockerfile, "RUN", "builder") if "pip wheel" in r.args]
    assert len(wheel) == 1 and "--no-cache-dir" in wheel[0].args and f'".[{IMAGE_EXTRAS}]"' in wheel[0].args
    # ... and the runtime installs them from the builder with no index and no pip cache
    install = [r for r in _only(dockerfile, "RUN", "runtime") if "pip install" in r.args]
    assert len(install) == 1
    args = install[0].args
    assert "--mount=type=bind,from=builder,source=/wheels" in args
    for flag in ("--no-cache-dir", "--no-index", "--find-links=/wheels", f'"dspex-tasks[{IMAGE_EXTRAS}]"'):
        assert flag in args, flag
    assert "import flower, redbeat, fastapi, uvicorn, dspex_tasks.worker.celery_app" in args  # a missing extra fails


def test_dockerfile_builds_every_package_pyproject_declares(dockerfile: list[Instruction]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setup = pyproject["tool"]["setuptools"]
    # every directory the wheel's packages come from: dspex_tasks/, and signatures/ (shipped as dspex_tasks.examples)
    sources = {setup.get("package-dir", {}).get(p, p.replace(".", "/")).split("/")[0] for p in setup["packages"]}
    copied = {ins.args.split()[0].rstrip("/") for ins in _only(dockerfile, "COPY", "builder")}
    assert sources == {"dspex_tasks", "signatures"} and sources <= copied, f"not copied: {sources - copied}"
    assert {"pyproject.toml", "README.md"} <= {a for ins in _only(dockerfile, "COPY", "builder")
                                                for a in ins.args.split()[:-1]}
    assert pyproject["project"]["readme"] == "README.md"


def _constraints() -> tuple[dict[str, str], dict[str, str]]:
    """deploy/constraints.txt as {normalized name: version} and its ``# key value`` header facts."""
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    facts: dict[str, str] = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line.startswith("# python_version "):
            facts["python_version"] = line.split()[2].rstrip(",")
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert m, f"constraints.txt: not a name==version pin: {line!r}"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = m.group(2)
    return pins, facts


def test_dockerfile_builds_from_a_constraints_file_that_pins_every_runtime_dependency(
        dockerfile: list[Instruction]) -> None:
    from importlib import metadata

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    # The builder copies deploy/constraints.txt and pip wheel uses it (-c), so the image gets the tested versions.
    workdir = _only(dockerfile, "WORKDIR", "builder")[-1].args
    copied: dict[str, str] = {}  # file -> where it lands, relative to WORKDIR
    for ins in _only(dockerfile, "COPY", "builder"):
        *sources, dest = ins.args.split()
        for src in sources:
            copied[src] = dest + Path(src).name if dest.endswith("/") else dest
    assert "deploy/constraints.txt" in copied, "the builder does not copy deploy/constraints.txt"
    inside = (Path(workdir) / copied["deploy/constraints.txt"]).as_posix().replace("/./", "/")
    (wheel,) = [r.args for r in _only(dockerfile, "RUN", "builder") if "pip wheel" in r.args]
    argv = shlex.split(wheel)
    assert "-c" in argv or "--constraint" in argv, "pip wheel ignores the constraints file"
    given = _arg(argv, "-c" if "-c" in argv else "--constraint")
    assert (Path(workdir) / given).as_posix() == inside
    extras = re.search(r"\.\[([\w,-]+)\]", wheel)
    assert extras and extras.group(1) == IMAGE_EXTRAS

    pins, facts = _constraints()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert canonicalize_name(pyproject["project"]["name"]) not in pins, "the project itself is built, not pinned"
    # ... for the image's Python (environment markers were evaluated for it)
    (base,) = {m.group(1) for f in _only(dockerfile, "FROM") if (m := re.match(r"python:(\d+\.\d+)-", f.args))}
    assert facts.get("python_version") == base, "constraints.txt was resolved for another Python than the image's"
    env = {**default_environment(), "python_version": base}
    # Every runtime dependency of pyproject.toml, and of the extras the image installs, is pinned to a version
    # its specifier allows.
    direct = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    for extra in IMAGE_EXTRAS.split(","):
        direct += [Requirement(r) for r in pyproject["project"]["optional-dependencies"][extra]]
    for req in direct:
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name}: run `make constraints`"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is not {req.specifier}"
    # ... and so is what they need in turn, as far as this environment's installed metadata tells (packages
    # installed at the pinned version only: another version may need other things).
    todo = [(req, frozenset(req.extras)) for req in direct]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, req_extras = todo.pop()
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name} (needed by the image): run `make constraints`"
        if (name, req_extras) in seen:
            continue
        seen.add((name, req_extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != pins[name]:
            continue
        for raw in dist.requires or []:
            sub = Requirement(raw)
            wanted = [""] + sorted(req_extras)
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in wanted):
                todo.append((sub, frozenset(sub.extras)))


def test_dockerfile_copies_only_what_exists_and_the_dockerignore_lets_through(dockerfile: list[Instruction]) -> None:
    ignore = DEPLOY / "Dockerfile.dockerignore"  # BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile
    patterns = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for ins in _only(dockerfile, "COPY"):
        if ins.heredocs or "--from" in ins.args:
            continue
        *sources, _dest = [a for a in ins.args.split() if not a.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert not _dockerignore_excludes(src, patterns), f"COPY {src}: excluded by {ignore.name}"
            if (ROOT / src).is_dir():
                assert not _dockerignore_excludes(f"{src.rstrip('/')}/__init__.py", patterns)
    for unwanted in (".venv/bin/python", ".git/config", "tests/unit/test_deploy.py", "dspex_tasks/__pycache__/x.pyc",
                     ".env", "deploy/lm.env"):
        assert _dockerignore_excludes(unwanted, patterns), f"{unwanted} would be sent to the builder"


def test_dockerfile_runs_as_the_unprivileged_user(dockerfile: list[Instruction], manifests: list[dict[str, Any]]) -> None:
    runtime = _runtime_stage(dockerfile)
    users = _only(dockerfile, "USER", runtime)
    assert len(users) == 1
    uid, _, gid = users[0].args.partition(":")
    # Numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd
    assert uid.isdigit() and int(uid) == IMAGE_UID and int(gid or uid) == IMAGE_UID
    created = " ".join(r.args for r in _only(dockerfile, "RUN", runtime))
    assert f"useradd --uid {IMAGE_UID} --gid {IMAGE_UID}" in created
    # Build steps run as root, before it; the container runs as the user
    assert [i.keyword for i in dockerfile].index("USER") > max(
        n for n, i in enumerate(dockerfile) if i.keyword in ("RUN", "COPY"))
    for name, dep in _of_kind(manifests, "Deployment").items():
        assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == IMAGE_UID, name


def test_dockerfile_environment_defaults_are_valid_settings(dockerfile: list[Instruction],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env_of(dockerfile, _runtime_stage(dockerfile))
    assert env["PYTHONUNBUFFERED"] == "1"
    assert {"DSPEX_REDIS_URL", "DSPEX_LM"} <= set(env)
    settings = _settings_from(monkeypatch, {k: v for k, v in env.items() if k.startswith("DSPEX_")})
    assert settings.redis_url == "redis://redis:6379/0"  # the compose service's name
    assert settings.lm == "mock"
    # flower_config.py binds loopback by default: a container must listen on its interface
    assert env["FLOWER_ADDRESS"] == "0.0.0.0"
    flower_dir = str(Path(env["FLOWER_DB"]).parent)
    assert any(f"-o {IMAGE_UID} -g {IMAGE_UID} {flower_dir}" in r.args for r in _only(dockerfile, "RUN"))


def test_dockerfile_entrypoint_is_the_project_cli(dockerfile: list[Instruction]) -> None:
    runtime = _runtime_stage(dockerfile)
    (entrypoint,) = _only(dockerfile, "ENTRYPOINT", runtime)
    (cmd,) = _only(dockerfile, "CMD", runtime)
    argv = _exec_form(entrypoint)
    assert argv[:2] == ["/usr/bin/tini", "--"], "tini forwards SIGTERM (warm shutdown) and reaps children"
    assert argv[2:] == ["dspex"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["dspex"] == "dspex_tasks.cli:main"
    assert _exec_form(cmd) == ["worker"]
    _parse_cli(_exec_form(cmd))
    # `docker run IMAGE worker|beat|flower|gateway` work: each is a command of the CLI
    for role in ("worker", "beat", "flower", "gateway"):
        _parse_cli([role])
    (stop,) = _only(dockerfile, "STOPSIGNAL", runtime)
    assert stop.args == "SIGTERM"


def test_dockerfile_healthcheck_checks_each_role(dockerfile: list[Instruction]) -> None:
    runtime = _runtime_stage(dockerfile)
    (check,) = _only(dockerfile, "HEALTHCHECK", runtime)
    assert _exec_form(check) == ["dspex-healthcheck"]
    scripts = [ins for ins in _only(dockerfile, "COPY", runtime) if ins.args.endswith("/usr/local/bin/dspex-healthcheck")]
    assert len(scripts) == 1 and "--chmod=0755" in scripts[0].args
    (body,) = scripts[0].heredocs
    assert body.startswith("#!/bin/sh\n")
    worker = re.search(r'\*" worker"\*\) exec (.+?) > /dev/null ;;', body)
    assert worker, body
    argv = shlex.split(worker.group(1))
    assert argv[:2] == ["dspex", "health"] and "--local" in argv
    params = _parse_cli(argv[1:])
    assert params["local"] is True and params["timeout"] <= 10
    assert "/healthcheck" in body and '*" flower"*)' in body
    assert re.search(r"\*\) exit 0 ;;", body), "beat has no check of its own"


def _run_healthcheck(body: str, argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Run the image's dspex-healthcheck with PID 1 running ``argv``: what it executes (python and dspex stubbed)."""
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    script = tmp_path / "dspex-healthcheck"
    script.write_text(body.replace("/proc/1/cmdline", str(cmdline)))
    stubs, out = tmp_path / "bin", tmp_path / "ran"
    stubs.mkdir(exist_ok=True)
    out.unlink(missing_ok=True)
    for tool in ("python", "dspex"):
        (stubs / tool).write_text(f'#!/bin/sh\nprintf \'%s\\0\' {tool} "$@" > "$HC_OUT"\n')
        (stubs / tool).chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HC_OUT": str(out)}
    done = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
    return out.read_text().split("\0")[:-1] if out.exists() else []


def _url_fetched(ran: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """The URL the healthcheck's ``python -c`` program opens (run in-process with urlopen recorded)."""
    import urllib.request

    assert ran[:2] == ["python", "-c"], ran
    opened: list[str] = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: opened.append(url))
    monkeypatch.setattr(sys, "argv", ["-c", *ran[3:]])
    exec(compile(ran[2], "<dspex-healthcheck>", "exec"), {})
    (url,) = opened
    return url


def test_dockerfile_healthcheck_probes_the_gateway_on_its_port(dockerfile: list[Instruction], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                compose: dict[str, Any],
                                                                manifests: list[dict[str, Any]]) -> None:
    (script,) = [ins for ins in _only(dockerfile, "COPY", _runtime_stage(dockerfile))
                 if ins.args.endswith("/usr/local/bin/dspex-healthcheck")]
    (body,) = script.heredocs
    pid1 = ["/usr/bin/tini", "--", "dspex"]
    default_port = _parse_cli(["gateway"])["port"]
    container = _container(_of_kind(manifests, "Deployment")["dspex-gateway"])
    for args, port in ((["gateway"], default_port), (["gateway", "-p", "9001"], 9001),
                       (["gateway", "--port=9002", "--workers", "2"], 9002),
                       ([str(a) for a in compose["services"]["gateway"]["command"]], 8000),
                       (container["args"], container["ports"][0]["containerPort"])):
        assert _parse_cli(args)["port"] == port
        url = _url_fetched(_run_healthcheck(body, pid1 + args, tmp_path, monkeypatch), monkeypatch)
        assert url == f"http://127.0.0.1:{port}/healthz", args
    # the other roles keep their checks
    flower = _run_healthcheck(body, [*pid1, "flower"], tmp_path, monkeypatch)
    assert _url_fetched(flower, monkeypatch) == "http://127.0.0.1:5555/healthcheck"
    worker = _run_healthcheck(body, [*pid1, "worker", "--queues", DEFAULTS.predict_queue], tmp_path, monkeypatch)
    assert worker[:3] == ["dspex", "health", "--local"]
    assert _run_healthcheck(body, [*pid1, "beat"], tmp_path, monkeypatch) == []


def test_flower_in_the_image_finds_its_config_and_starts_with_auth(dockerfile: list[Instruction], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = _runtime_stage(dockerfile)
    workdir = _only(dockerfile, "WORKDIR", runtime)[-1].args
    # The image copies no flower_config.py: `dspex flower` uses the one the package ships, wherever it is installed
    assert not [ins for ins in _only(dockerfile, "COPY", runtime) if "flower_config.py" in ins.args]
    site = tmp_path / "lib" / "site-packages" / "dspex_tasks" / "cli"
    site.mkdir(parents=True)
    monkeypatch.setattr(cli_ops, "__file__", str(site / "ops.py"))
    monkeypatch.chdir(tmp_path)
    packaged = site.parent / "observability" / "flower_config.py"
    assert cli_ops.default_flower_conf() == packaged
    assert (ROOT / "dspex_tasks" / "observability" / "flower_config.py").is_file() and Path(workdir).is_absolute()
    argv = cli_ops.flower_argv(packaged)
    assert argv[1:] == ["-m", "celery", "-A", "dspex_tasks.worker.celery_app", "flower", f"--conf={packaged}"]
    # The image's FLOWER_* settings with compose's FLOWER_BASIC_AUTH pass flower_config.py's checks ...
    env = _env_of(dockerfile, runtime)
    for var in list(os.environ):
        if var.startswith(("FLOWER_", "DSPEX_FLOWER_")):
            monkeypatch.delenv(var)
    monkeypatch.setenv("FLOWER_ADDRESS", env["FLOWER_ADDRESS"])
    monkeypatch.setenv("FLOWER_DB", str(tmp_path / "state" / "flower.db"))
    monkeypatch.setattr(sys, "argv", argv[2:])
    with pytest.raises(SystemExit, match="refusing to start Flower without authentication"):
        runpy.run_path(str(ROOT / "flower_config.py"))
    # ... and with credentials it starts
    monkeypatch.setenv("FLOWER_BASIC_AUTH", COMPOSE_ENV["FLOWER_BASIC_AUTH"])
    ns = runpy.run_path(str(ROOT / "flower_config.py"))
    assert ns["basic_auth"] == [COMPOSE_ENV["FLOWER_BASIC_AUTH"]]
    assert (tmp_path / "state").is_dir()


# == The worker command: the same in the image, compose, Kubernetes and the system tests =========================

def test_dspex_worker_runs_the_celery_worker_the_system_tests_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                  compose: dict[str, Any]) -> None:
    system = _system_test_worker_argv(monkeypatch, tmp_path)
    assert system[1:6] == ["-m", "celery", "-A", "workers.app", "worker"]
    system_opts = _celery_options(system)
    # workers/app.py, the app the system tests load, is the packaged app `dspex worker` builds too
    assert "from dspex_tasks.worker.celery_app import app, celery" in (ROOT / "workers" / "app.py").read_text()
    assert "app = create_worker_app()" in (ROOT / "dspex_tasks" / "worker" / "celery_app.py").read_text()

    command = [str(a) for a in compose["services"]["worker-predict"]["command"]]
    calls = _run_cli(monkeypatch, command, {"DSPEX_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert [c[0] for c in calls] == ["worker_main"]
    argv = calls[0][1]
    assert argv[0] == "worker"
    opts = _celery_options(argv)
    assert set(opts) <= set(system_opts), f"options the system tests never exercise: {set(opts) - set(system_opts)}"
    # predictions, and Celery's default queue for zero-configuration Celery clients (test_first_hour.py)
    assert opts["queues"] == f"{DEFAULTS.predict_queue},{DEFAULTS.bare_queue}"
    assert system_opts["queues"] == DEFAULTS.predict_queue
    assert opts["pool"] == system_opts["pool"] == "threads"
    assert opts["concurrency"] == _arg(command, "--concurrency")
    # The node name the health check's --local looks for: <name>@<this host>
    assert opts["hostname"] == "dspex@%h"
    assert cli_ops.is_local_worker("dspex@pod-1", "pod-1") and not cli_ops.is_local_worker("dspex@pod-2", "pod-1")


def test_dspex_beat_runs_celery_beat(monkeypatch: pytest.MonkeyPatch, compose: dict[str, Any]) -> None:
    calls = _run_cli(monkeypatch, [str(a) for a in compose["services"]["beat"]["command"]],
                     {"DSPEX_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert calls == [("start", ["beat", "--loglevel", "INFO"])]


# == docker-compose.yml ===========================================================================================

def test_compose_file_validates_against_the_compose_specification(compose_raw: dict[str, Any], compose: dict[str, Any],
                                                                  compose_validator: jsonschema.Draft7Validator) -> None:
    for doc in (compose_raw, compose):
        errors = [f"{e.json_path}: {e.message}" for e in compose_validator.iter_errors(doc)]
        assert not errors, errors


def test_the_vendored_schema_rejects_what_compose_rejects(compose: dict[str, Any],
                                                          compose_validator: jsonschema.Draft7Validator) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["beat"]["replica"] = 1  # a typo of deploy.replicas
    assert any("replica" in e.message for e in compose_validator.iter_errors(broken))
    broken = json.loads(json.dumps(compose))
    broken["services"]["redis"]["depends_on"] = {"beat": {"condition": "healthy"}}
    assert list(compose_validator.iter_errors(broken))


def test_compose_requires_the_redis_password_and_flower_credentials(compose_raw: dict[str, Any]) -> None:
    required = {name for name, op, _ in _compose_variables(compose_raw) if op == ":?"}
    assert required == {"REDIS_PASSWORD", "FLOWER_BASIC_AUTH"}
    for var in required:
        with pytest.raises(MissingVariable, match=var):
            interpolate(compose_raw, {k: v for k, v in COMPOSE_ENV.items() if k != var})
        with pytest.raises(MissingVariable, match=var):  # empty counts as missing
            interpolate(compose_raw, {**COMPOSE_ENV, var: ""})


def test_compose_redis_is_durable_password_protected_and_never_evicts(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"] == "redis:7-alpine"
    argv = [str(a) for a in redis["command"]]
    assert argv[0] == "redis-server"
    assert _arg(argv, "--appendonly") == "yes"
    assert _arg(argv, "--requirepass") == COMPOSE_ENV["REDIS_PASSWORD"]
    assert _arg(argv, "--maxmemory-policy") == "noeviction"
    volume, _, target = redis["volumes"][0].partition(":")
    assert target == "/data" and volume in compose["volumes"]
    assert redis["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    assert redis["environment"]["REDISCLI_AUTH"] == COMPOSE_ENV["REDIS_PASSWORD"]
    assert all(p.startswith("127.0.0.1:") for p in redis.get("ports", [])), "Redis only on loopback"


def test_compose_dspex_services_share_one_image_and_wait_for_redis(compose: dict[str, Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    services = _dspex_services(compose)
    assert set(services) == {"worker-predict", "worker-optimize", "beat", "flower", "gateway"}
    assert len({json.dumps([svc["image"], svc["build"]], sort_keys=True) for svc in services.values()}) == 1
    build = next(iter(services.values()))["build"]
    assert build["context"] == ".." and (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    for name, svc in services.items():
        assert svc["depends_on"] == {"redis": {"condition": "service_healthy"}}, name
        _parse_cli([str(a) for a in svc["command"]])
        env = _env_dict(svc)
        settings = _settings_from(monkeypatch, {k: v for k, v in env.items() if k.startswith("DSPEX_")})
        assert settings.redis_url == f"redis://:{COMPOSE_ENV['REDIS_PASSWORD']}@redis:6379/0", name
        # The password in the URL is the one Redis requires
        assert f":{_arg([str(a) for a in compose['services']['redis']['command']], '--requirepass')}@" in settings.redis_url
        # LM credentials go to workers only, and are never blanked (an empty DSPEX_* value is invalid)
        lm_vars = {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "DSPEX_LM_API_KEY"}
        if name.startswith("worker-"):
            assert lm_vars <= set(env) and all(env[v] is None for v in lm_vars), name
        else:
            assert not lm_vars & set(env), name


def test_compose_runs_one_worker_service_per_queue(compose: dict[str, Any], compose_raw: dict[str, Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    queues = {name: _arg([str(a) for a in svc["command"]], "--queues")
              for name, svc in _dspex_services(compose).items() if svc["command"][0] == "worker"}
    assert queues == {"worker-predict": f"{DEFAULTS.predict_queue},{DEFAULTS.bare_queue}",
                      "worker-optimize": DEFAULTS.optimize_queue}
    predict, optimize = compose["services"]["worker-predict"], compose["services"]["worker-optimize"]
    assert compose_raw["services"]["worker-predict"]["deploy"]["replicas"] == "${PREDICT_WORKERS:-2}"
    assert int(predict["deploy"]["replicas"]) == 2 and int(optimize["deploy"]["replicas"]) == 1
    # Optimization stages are leased and checkpointed, so they may come back sooner; the timeout applies
    # to every message in the Redis DB, so it must still outlast the longest predict task.
    shared = _settings_from(monkeypatch, {k: v for k, v in _env_dict(predict).items() if k.startswith("DSPEX_")})
    opt = _settings_from(monkeypatch, {k: v for k, v in _env_dict(optimize).items() if k.startswith("DSPEX_")})
    assert LONGEST_LM_CALL_S < opt.visibility_timeout_s < shared.visibility_timeout_s
    # the budget settings enforce (issue 13), with the predict workers' LM settings too
    assert max(shared.longest_lm_call_s, opt.longest_lm_call_s) < opt.visibility_timeout_s
    for svc in (predict, optimize):
        assert _seconds(svc["stop_grace_period"]) >= LONGEST_LM_CALL_S, "warm shutdown must outlast an LM call"


def test_compose_runs_exactly_one_beat(compose: dict[str, Any]) -> None:
    beats = [name for name, svc in _dspex_services(compose).items() if svc["command"] == ["beat"]]
    assert beats == ["beat"]
    assert int(compose["services"]["beat"]["deploy"]["replicas"]) == 1


def test_compose_flower_requires_basic_auth(compose: dict[str, Any], compose_raw: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    assert flower["command"] == ["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == COMPOSE_ENV["FLOWER_BASIC_AUTH"]
    assert compose_raw["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
    volume, _, target = flower["volumes"][0].partition(":")
    assert volume in compose["volumes"] and target == "/var/lib/flower"


def _published(port: str | dict[str, Any]) -> tuple[str | None, str, str]:
    """(host address, host port, container port) of a compose port, short or long syntax."""
    if isinstance(port, dict):
        return port.get("host_ip"), str(port.get("published", "")), str(port["target"])
    parts = str(port).rsplit(":", 2)
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return None, parts[0] if len(parts) == 2 else "", parts[-1]


def test_compose_publishes_every_port_on_loopback_only(compose: dict[str, Any]) -> None:
    published = {name: [_published(p) for p in svc.get("ports", [])] for name, svc in compose["services"].items()}
    for name, ports in published.items():
        for host, host_port, _ in ports:
            # Flower can submit tasks and stop workers (and serves /metrics unauthenticated), Redis is the whole
            # state, the gateway serves jobs: none of it belongs on every interface of the host.
            assert host == "127.0.0.1", f"{name} publishes {host_port} on {host or 'every interface'}"
            assert host_port, f"{name}: a random host port"
    assert {name for name, ports in published.items() if ports} == {"redis", "flower", "gateway"}


def test_compose_gateway_listens_in_the_container_and_publishes_on_loopback(compose: dict[str, Any],
                                                                           compose_raw: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    command = [str(a) for a in gateway["command"]]
    params = _parse_cli(command)
    assert command[0] == "gateway" and params["host"] == "0.0.0.0", "loopback inside a container is unreachable"
    assert params["no_auth"] is False and "DSPEX_GATEWAY_AUTH" not in gateway["environment"], "API keys stay on"
    assert [_published(p) for p in gateway["ports"]] == [("127.0.0.1", "8000", str(params["port"]))]
    assert compose_raw["services"]["gateway"]["ports"] == ["127.0.0.1:${GATEWAY_HOST_PORT:-8000}:8000"]


def test_compose_workers_serve_metrics_on_the_compose_network(compose: dict[str, Any],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("worker-predict", "worker-optimize"):
        svc = compose["services"][name]
        settings = _settings_from(monkeypatch, {k: v for k, v in _env_dict(svc).items() if k.startswith("DSPEX_")})
        assert settings.metrics_port and settings.metrics_host == "0.0.0.0", name
        # not published: the replicas of one service would all want the same host port
        assert "ports" not in svc, name


# == Kubernetes ===================================================================================================

WORKERS = {"dspex-worker-predict": f"{DEFAULTS.predict_queue},{DEFAULTS.bare_queue}",
           "dspex-worker-optimize": DEFAULTS.optimize_queue}


def test_manifests_are_well_formed_and_in_one_namespace(manifests: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in manifests)
    assert kinds == sorted(["Namespace", "Secret", "Secret", "Secret", "ConfigMap", "Service", "StatefulSet",
                            "Deployment", "Deployment", "Deployment", "Deployment", "Service", "TriggerAuthentication",
                            "ScaledObject", "ScaledObject", "Deployment", "Service"])
    assert _of_kind(manifests, "Namespace").keys() == {NAMESPACE}
    for doc in manifests:
        assert doc["apiVersion"] and doc["metadata"]["name"], doc["__file__"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, (doc["__file__"], doc["metadata"]["name"])
    for kind in ("Deployment", "StatefulSet"):
        for name, obj in _of_kind(manifests, kind).items():
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items(), name


def test_kustomization_lists_every_manifest(manifests: list[dict[str, Any]]) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    images = {_container(d)["image"].partition(":")[0] for d in _of_kind(manifests, "Deployment").values()}
    assert images == {kustomization["images"][0]["name"]}
    assert [i["name"] for i in kustomization["images"]] == ["dspex-tasks"]


def test_secrets_are_opaque_placeholders_and_every_reference_resolves(manifests: list[dict[str, Any]]) -> None:
    secrets = _of_kind(manifests, "Secret")
    for name, secret in secrets.items():
        assert secret["type"] == "Opaque" and "data" not in secret, name
        assert all("REPLACE_ME" in v for v in secret["stringData"].values()), f"{name}: placeholders only"
    assert {"REDIS_PASSWORD"} <= secrets["dspex-redis"]["stringData"].keys()
    assert {"FLOWER_BASIC_AUTH"} <= secrets["dspex-flower"]["stringData"].keys()
    assert {"OPENAI_API_KEY"} <= secrets["dspex-lm-keys"]["stringData"].keys()
    configs = _of_kind(manifests, "ConfigMap")
    for kind in ("Deployment", "StatefulSet"):
        for name, obj in _of_kind(manifests, kind).items():
            for container in obj["spec"]["template"]["spec"]["containers"]:
                for source in container.get("envFrom", []):
                    if "secretRef" in source:
                        assert source["secretRef"]["name"] in secrets, name
                    else:
                        assert source["configMapRef"]["name"] in configs, name
                for item in container.get("env", []):
                    ref = item.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in secrets[ref["name"]]["stringData"], (name, ref)
    for auth in _of_kind(manifests, "TriggerAuthentication").values():
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in secrets[ref["name"]]["stringData"], ref


def test_configmap_holds_real_settings_with_valid_values(manifests: list[dict[str, Any]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (config,) = _of_kind(manifests, "ConfigMap").values()
    data = config["data"]
    fields = {f"DSPEX_{name.upper()}" for name in Settings.model_fields}
    assert set(data) <= fields, f"not settings: {set(data) - fields}"
    assert all(isinstance(v, str) and v for v in data.values()), "ConfigMap values are non-empty strings"
    settings = _settings_from(monkeypatch, data)
    assert (f"{settings.predict_queue},{settings.bare_queue}", settings.optimize_queue) == tuple(WORKERS.values())
    assert "DSPEX_REDIS_URL" not in data, "built per Deployment from the Secret"


def test_worker_deployments_serve_one_queue_each_safely(manifests: list[dict[str, Any]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    deployments = _of_kind(manifests, "Deployment")
    (config,) = _of_kind(manifests, "ConfigMap").values()
    secrets = {n: s["stringData"] for n, s in _of_kind(manifests, "Secret").items()}
    for name, queue in WORKERS.items():
        dep = deployments[name]
        pod = dep["spec"]["template"]["spec"]
        container = _container(dep)
        args = container["args"]
        assert args[0] == "worker" and "command" not in container, "the image's ENTRYPOINT runs dspex"
        params = _parse_cli(args)
        # an Enum or its value, depending on whether typer converts choices at parse time
        assert params["queues"] == queue and getattr(params["pool"], "value", params["pool"]) == "threads"
        # Probes: the project's own health check, scoped to this pod's worker
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = container[probe]["exec"]["command"]
            assert command[:2] == ["dspex", "health"] and "--local" in command, (name, probe)
            health = _parse_cli(command[1:])
            assert container[probe]["timeoutSeconds"] > health["timeout"] + 2, (name, probe)
        assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 120
        # Warm shutdown outlasts the slowest LM call
        assert pod["terminationGracePeriodSeconds"] >= LONGEST_LM_CALL_S, name
        # Unprivileged, read-only root, /tmp writable
        assert pod["securityContext"]["runAsNonRoot"] is True
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
        assert "memory" in container["resources"]["limits"]
        # The environment a worker gets is valid settings, with the Secret's password in the Redis URL
        env = _expand_k8s_env(container, config["data"], secrets)
        settings = _settings_from(monkeypatch, {k: v for k, v in env.items() if k.startswith("DSPEX_")})
        assert settings.redis_url == f"redis://:{secrets['dspex-redis']['REDIS_PASSWORD']}@{env['REDIS_ADDRESS']}/0"
        assert env["REDIS_ADDRESS"] == f"dspex-redis.{NAMESPACE}.svc.cluster.local:6379"
        if name == "dspex-worker-optimize":
            assert LONGEST_LM_CALL_S < settings.visibility_timeout_s < DEFAULTS.visibility_timeout_s
            assert settings.longest_lm_call_s < settings.visibility_timeout_s
        assert "OPENAI_API_KEY" in env


def test_keda_scales_each_worker_on_every_list_its_queues_wait_in(manifests: list[dict[str, Any]],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    deployments = _of_kind(manifests, "Deployment")
    auths = _of_kind(manifests, "TriggerAuthentication")
    scaled = _of_kind(manifests, "ScaledObject")
    targets = {obj["spec"]["scaleTargetRef"]["name"]: obj for obj in scaled.values()}
    assert set(targets) == set(WORKERS)
    for target, obj in targets.items():
        spec = obj["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        # one trigger per Redis list of every queue the worker consumes: the queue's own list and its
        # priority lists (a message sent with a priority waits there, unseen by a trigger on the queue's name)
        consumed = _parse_cli(_container(deployments[target])["args"])["queues"].split(",")
        assert consumed == WORKERS[target].split(",")
        settings = _pod_settings(manifests, target, monkeypatch)
        expected = set().union(*(_waiting_lists(settings, q) for q in consumed))
        lists = [t["metadata"]["listName"] for t in spec["triggers"]]
        assert len(lists) == len(set(lists)) and set(lists) == expected, f"{target}: {sorted(map(repr, lists))}"
        # KEDA would take the largest single list; the formula adds them up: replicas follow every waiting message
        modifiers = spec["advanced"]["scalingModifiers"]
        names = [t["name"] for t in spec["triggers"]]
        assert all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in names) and len(set(names)) == len(names)
        assert sorted(term.strip() for term in modifiers["formula"].split("+")) == sorted(names)
        assert modifiers.get("metricType", "AverageValue") == "AverageValue" and int(modifiers["target"]) > 0
        env_names = [e["name"] for e in _container(deployments[target]).get("env", [])]
        for trigger in spec["triggers"]:
            assert trigger["type"] == "redis"
            meta = trigger["metadata"]
            assert meta["listLength"] == modifiers["target"], "one number per ScaledObject: the formula's target"
            assert meta["databaseIndex"] == "0"
            assert meta["addressFromEnv"] in env_names, "KEDA reads the address from the target container's env"
            auth = auths[trigger["authenticationRef"]["name"]]
            assert [r["parameter"] for r in auth["spec"]["secretTargetRef"]] == ["password"]


def test_keda_slows_scale_in_with_hpa_behavior_not_a_dead_cooldown(manifests: list[dict[str, Any]]) -> None:
    for name, obj in _of_kind(manifests, "ScaledObject").items():
        spec = obj["spec"]
        # cooldownPeriod only applies when scaling to zero (minReplicaCount 0, or idleReplicaCount 0)
        to_zero = spec.get("minReplicaCount", 0) == 0 or spec.get("idleReplicaCount") == 0
        assert to_zero or "cooldownPeriod" not in spec, f"{name}: cooldownPeriod does nothing with a minimum of 1"
        scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert scale_down["stabilizationWindowSeconds"] >= 60, name
        assert scale_down["policies"], name
        for policy in scale_down["policies"]:
            assert policy["type"] in ("Pods", "Percent") and policy["value"] > 0 and policy["periodSeconds"] > 0


def test_beat_is_a_single_replica_recreated(manifests: list[dict[str, Any]]) -> None:
    beat = _of_kind(manifests, "Deployment")["dspex-beat"]
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"] == {"type": "Recreate"}
    assert _container(beat)["args"] == ["beat"]
    _parse_cli(_container(beat)["args"])
    assert not any(obj["spec"]["scaleTargetRef"]["name"] == "dspex-beat"
                   for obj in _of_kind(manifests, "ScaledObject").values())


def test_flower_has_auth_a_service_and_a_probe(manifests: list[dict[str, Any]]) -> None:
    flower = _of_kind(manifests, "Deployment")["dspex-flower"]
    container = _container(flower)
    assert container["args"] == ["flower"]
    _parse_cli(container["args"])
    auth = {e["name"]: e for e in container["env"]}["FLOWER_BASIC_AUTH"]
    assert auth["valueFrom"]["secretKeyRef"] == {"name": "dspex-flower", "key": "FLOWER_BASIC_AUTH"}
    (port,) = container["ports"]
    assert port["containerPort"] == 5555
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthcheck", "port": port["name"]}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/var/lib/flower"} <= mounts and container["securityContext"]["readOnlyRootFilesystem"] is True
    service = _of_kind(manifests, "Service")["dspex-flower"]
    assert service["spec"]["selector"].items() <= flower["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


def test_dspex_deployments_share_one_locked_down_security_context(manifests: list[dict[str, Any]]) -> None:
    deployments = _of_kind(manifests, "Deployment")
    assert {"dspex-worker-predict", "dspex-worker-optimize", "dspex-beat", "dspex-flower",
            "dspex-gateway"} == set(deployments)
    reference = deployments["dspex-worker-predict"]
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"] == reference["spec"]["template"]["spec"]["securityContext"], name
        container = _container(dep)
        assert container["securityContext"] == _container(reference)["securityContext"], name
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[mounts["/tmp"]], name


def test_gateway_listens_on_the_pod_ip_with_a_service_and_probes(manifests: list[dict[str, Any]],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    gateway = _of_kind(manifests, "Deployment")["dspex-gateway"]
    container = _container(gateway)
    assert container["args"][0] == "gateway" and "command" not in container, "the image's ENTRYPOINT runs dspex"
    params = _parse_cli(container["args"])
    assert params["host"] == "0.0.0.0" and params["no_auth"] is False
    (port,) = container["ports"]
    assert port["containerPort"] == params["port"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    # no LM credentials: the gateway enqueues, workers call the LM
    assert [s for s in container.get("envFrom", []) if "secretRef" in s] == []
    settings = _pod_settings(manifests, "dspex-gateway", monkeypatch)
    env = _pod_env(manifests, "dspex-gateway")
    assert settings.redis_url == f"redis://:{env['REDIS_PASSWORD']}@{env['REDIS_ADDRESS']}/0"
    assert settings.gateway_auth is True
    service = _of_kind(manifests, "Service")["dspex-gateway"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= gateway["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    # no other Deployment's pods behind the Service
    others = [n for n, d in _of_kind(manifests, "Deployment").items()
              if n != "dspex-gateway" and _selects({"matchLabels": service["spec"]["selector"]},
                                                   d["spec"]["template"]["metadata"]["labels"])]
    assert not others


def test_worker_deployments_expose_the_metrics_port_their_env_sets(manifests: list[dict[str, Any]],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for name in WORKERS:
        settings = _pod_settings(manifests, name, monkeypatch)
        assert settings.metrics_port, f"{name}: DSPEX_METRICS_PORT unset, no /metrics"
        assert settings.metrics_host == "0.0.0.0", f"{name}: /metrics on loopback is out of Prometheus's reach"
        ports = {p["name"]: p["containerPort"] for p in _container(_of_kind(manifests, "Deployment")[name])["ports"]}
        assert ports.get("metrics") == settings.metrics_port, name


def test_podmonitors_scrape_the_workers_and_the_gateway_with_its_key(manifests: list[dict[str, Any]],
                                                                     monitoring: list[dict[str, Any]]) -> None:
    deployments = _of_kind(manifests, "Deployment")
    monitors = _of_kind(monitoring, "PodMonitor")
    assert set(monitors) == {"dspex-workers", "dspex-gateway"}
    secrets = _of_kind(monitoring, "Secret")
    scraped: dict[str, set[str]] = {}  # Deployment -> the port names scraped
    for name, monitor in monitors.items():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["namespace"] == NAMESPACE
        spec = monitor["spec"]
        assert "namespaceSelector" not in spec, "the PodMonitor's own namespace, where the pods and the Secret are"
        selected = [d for d, dep in deployments.items()
                    if _selects(spec["selector"], dep["spec"]["template"]["metadata"]["labels"])]
        assert selected, f"{name} selects no pods"
        for endpoint in spec["podMetricsEndpoints"]:
            assert endpoint["path"] == "/metrics"
            for dep in selected:
                names = {p["name"] for p in _container(deployments[dep]).get("ports", [])}
                assert endpoint["port"] in names, f"{name}: {dep} has no port named {endpoint['port']}"
                scraped.setdefault(dep, set()).add(endpoint["port"])
            auth = endpoint.get("authorization")
            if auth:
                assert auth["type"] == "Bearer"
                ref = auth["credentials"]
                assert ref["key"] in secrets[ref["name"]]["stringData"], ref
    assert scraped == {**{w: {"metrics"} for w in WORKERS}, "dspex-gateway": {"http"}}
    # the gateway's /metrics needs a key with the read right: the PodMonitor sends one from a Secret
    (gateway_endpoint,) = monitors["dspex-gateway"]["spec"]["podMetricsEndpoints"]
    assert gateway_endpoint["authorization"]["type"] == "Bearer"
    (secret,) = secrets.values()
    assert secret["type"] == "Opaque" and all("REPLACE_ME" in v for v in secret["stringData"].values())


def test_monitoring_is_an_optional_kustomize_component(monitoring: list[dict[str, Any]]) -> None:
    component = yaml.safe_load((K8S / "monitoring" / "kustomization.yaml").read_text())
    assert component["kind"] == "Component" and component["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    files = {p.name for p in (K8S / "monitoring").glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(component["resources"]) == sorted(files)
    # Off by default: PodMonitor is a Prometheus Operator CRD, and `kubectl apply -k deploy/k8s` must work without it
    text = (K8S / "kustomization.yaml").read_text()
    assert "monitoring" not in (yaml.safe_load(text).get("components") or [])
    assert re.search(r"^# components:\n#   - monitoring$", text, re.M), "say how to enable it"
    assert all(d["kind"] in ("PodMonitor", "Secret") for d in monitoring)
    # The key the gateway's PodMonitor needs is made with the real CLI, read-only (deploy/README.md, secret.yaml)
    for doc in (DEPLOY / "README.md", K8S / "monitoring" / "secret.yaml"):
        commands = re.findall(r"dspex (keys create --name prometheus\b[^`\n]*)", doc.read_text())
        assert commands, f"{doc.name} does not say how to create Prometheus's key"
        for command in commands:
            group = typer.main.get_command(cli.app)
            root = group.make_context("dspex", [], resilient_parsing=True)
            keys = group.get_command(root, "keys")
            argv = shlex.split(command)[1:]
            create = keys.get_command(keys.make_context("keys", [], parent=root, resilient_parsing=True), argv[0])
            params = create.make_context(argv[0], argv[1:], parent=root).params
            assert list(params["rights"]) == ["read"], command


def test_redis_statefulset_persists_and_requires_the_password(manifests: list[dict[str, Any]]) -> None:
    redis = _of_kind(manifests, "StatefulSet")["dspex-redis"]
    container = _container(redis)
    args = [str(a) for a in container["args"]]
    assert _arg(args, "--appendonly") == "yes"
    assert _arg(args, "--requirepass") == "$(REDIS_PASSWORD)"
    assert _arg(args, "--maxmemory-policy") == "noeviction"
    env = [e["name"] for e in container["env"]]
    assert env.index("REDIS_PASSWORD") >= 0
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"mountPath": "/data", "name": claim["metadata"]["name"]} in container["volumeMounts"]
    service = _of_kind(manifests, "Service")[redis["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None"
    assert redis["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    for probe in ("readinessProbe", "livenessProbe"):
        assert "redis-cli ping" in " ".join(container[probe]["exec"]["command"])


# == deploy/README.md =============================================================================================

def test_readme_names_only_real_settings_and_every_compose_variable(compose_raw: dict[str, Any]) -> None:
    readme = (DEPLOY / "README.md").read_text()
    fields = {f"DSPEX_{name.upper()}" for name in Settings.model_fields}
    mentioned = set(re.findall(r"\bDSPEX_[A-Z0-9_]*[A-Z0-9]\b", readme))
    assert mentioned and mentioned <= fields, f"not settings: {mentioned - fields}"
    undocumented = {name for name, _, _ in _compose_variables(compose_raw)} - set(re.findall(r"\b[A-Z][A-Z0-9_]+\b", readme))
    assert not undocumented, f"compose variables missing from deploy/README.md: {undocumented}"
    for phrase in ("noeviction", "rediss://", "--scale worker-predict=", "listLength", "terminationGracePeriodSeconds"):
        assert phrase in readme, phrase
