"""Layer 2: clients generated from the gateway's live OpenAPI document type every route.

* openapi-python-client (a dev dependency) generates a package with no warning, mypy --strict accepts it, it
  has a function for every operation of the document, and it talks to the live gateway with typed models;
* openapi-typescript and tsc --strict (npm packages, installed on demand: set ``DSPEX_TEST_TYPESCRIPT=1``,
  as CI need not) type a file that uses every route's types (``gateway_types.ts``).

The fixtures are ``test_gateway``'s, instantiated anew for this module (its own namespace, worker and gateway).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dspex_tasks.testing.mockgen import rule_answer
from tests.redis import test_gateway as shared
from tests.redis.test_gateway import Served

gw_settings, gw_worker, redis_module = shared.gw_settings, shared.gw_worker, shared.redis_module
_started, serve, gw, key_store, api_key = shared._started, shared.serve, shared.gw, shared.key_store, shared.api_key

pytestmark = pytest.mark.redis

HERE = Path(__file__).resolve().parent
PACKAGE = "dspex_gateway_client"
#: The npm packages of the TypeScript check, pinned: the versions it was written against.
TS_PACKAGES = ("openapi-typescript@7.13.0", "typescript@5.9.3")
_METHODS = ("get", "put", "post", "delete", "patch")


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in _METHODS:
                yield path, method, op


def _snake(name: str) -> str:
    """The module name openapi-python-client gives an operation id."""
    return re.sub(r"[^a-z0-9]+", "_", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()).strip("_")


@pytest.fixture(scope="module")
def document(gw: Served) -> dict[str, Any]:
    with gw.client() as c:  # public: generators fetch it without a key
        r = c.get("/openapi.json")
    assert r.status_code == 200
    doc: dict[str, Any] = r.json()
    return doc


@pytest.fixture(scope="module")
def python_client(document: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The package openapi-python-client generates from the live document, imported."""
    where = tmp_path_factory.mktemp("python-client")
    (where / "openapi.json").write_text(json.dumps(document))
    # no post hooks: they run ruff from PATH on the output, which tests nothing about the document
    (where / "config.json").write_text(json.dumps({"post_hooks": [], "package_name_override": PACKAGE}))
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "openapi_python_client", "generate", "--path", "openapi.json",
                          "--config", "config.json", "--meta", "none", "--output-path", PACKAGE],
                         cwd=where, capture_output=True, text=True, timeout=120, check=False)
    said = out.stdout + out.stderr
    assert out.returncode == 0, said
    # a schema it cannot read, or an endpoint it drops, is a warning (the generator still exits 0)
    assert "Warning" not in said and "will not be generated" not in said, said
    assert time.monotonic() - started < 60
    sys.path.insert(0, str(where))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(where))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def test_every_object_in_the_document_has_a_shape(document: dict[str, Any]) -> None:
    """No object that a generator types as one that holds nothing (TypeScript's ``Record<string, never>``): each
    has its properties, or says that its keys are data (``additionalProperties``)."""
    shapeless: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            kinds = node.get("type") if isinstance(node.get("type"), list) else [node.get("type")]
            if "object" in kinds and not {"properties", "additionalProperties", "$ref", "oneOf", "anyOf"} & node.keys():
                shapeless.append(where)
            for key, value in node.items():
                if key != "not":  # what a value must not be describes no value
                    walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(document["components"], "#/components")
    walk(document["paths"], "#/paths")
    assert shapeless == []
    # the streams document one event each (itemSchema) and no whole-body schema a generator would parse
    for path in ("/v1/jobs/{job_id}/events", "/v1/optimizations/{run_id}/events"):
        op = document["paths"][path]["get"]
        stream = op["responses"]["200"]["content"]["text/event-stream"]
        assert "schema" not in stream and stream["itemSchema"]["required"] == ["data"]
        assert "Last-Event-ID" in op["description"] and "curl -N" in op["description"]


def test_the_python_client_has_a_typed_function_for_every_operation(document: dict[str, Any],
                                                                      python_client: Any) -> None:
    ops = list(_operations(document))
    assert len(ops) >= 24  # the fixed routes and four per signature (qa, complex_analysis)
    for path, method, op in ops:
        tag = op["tags"][0]
        module = importlib.import_module(f"{PACKAGE}.api.{tag}.{_snake(op['operationId'])}")
        for fn in ("sync_detailed", "asyncio_detailed"):
            assert callable(getattr(module, fn, None)), f"{method.upper()} {path}: no {fn}"
    models = importlib.import_module(f"{PACKAGE}.models")
    # the states are enums, the optimization body one object per signature with both sources optional
    assert {s.value for s in models.JobState} >= {"PENDING", "STARTED", "SUCCESS", "FAILURE"}
    assert {s.value for s in models.RunStatus} == {"queued", "running", "succeeded", "failed", "cancelled"}
    unset = importlib.import_module(f"{PACKAGE}.types").Unset
    request = models.QaOptimizationRequest(signature="qa")
    assert isinstance(request.trainset, unset) and isinstance(request.dataset, unset)  # neither is required
    # mypy --strict accepts what was generated (a model whose field shares its name once broke it)
    where = Path(python_client.__file__).parent
    checked = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(where.parent / ".mypy"),
                              "--no-error-summary", PACKAGE], cwd=where.parent, capture_output=True, text=True,
                             timeout=180, check=False)
    assert checked.returncode == 0, checked.stdout[-4000:] + checked.stderr[-2000:]


def test_the_python_client_drives_the_live_gateway(gw: Served, api_key: str, python_client: Any) -> None:
    from importlib import import_module

    api = f"{PACKAGE}.api"
    models = import_module(f"{PACKAGE}.models")
    run_qa = import_module(f"{api}.signatures.run_qa")
    start = import_module(f"{api}.optimizations.start_optimization")
    get_run = import_module(f"{api}.optimizations.get_optimization")
    job_stream = import_module(f"{api}.jobs.job_stream")
    with python_client.AuthenticatedClient(base_url=gw.url, token=api_key, raise_on_unexpected_status=True) as c:
        # Given a typed request, the typed job comes back with typed outputs, usage and an enum state
        job = run_qa.sync(client=c, body=models.QaJobRequest(inputs=models.QaInputs(question="Why is the sky blue?")))
        assert isinstance(job, models.QaJob), job
        assert job.state is models.JobState.SUCCESS and isinstance(job.result.outputs.answer, str)
        assert isinstance(job.result.usage, models.Usage) and isinstance(job.result.usage.lm_calls, int)
        # its event stream: text/event-stream, each frame's data a typed event
        events = job_stream.sync_detailed(job.id, client=c)
        assert events.status_code == 200 and events.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in events.content.decode().splitlines() if line.startswith("data: ")]
        last = models.JobResultEvent.from_dict(json.loads(data[-1]))
        assert last.result.outputs["answer"] == job.result.outputs.answer
        # an optimization: one object per signature; rows are the inputs, typed, and labels
        rows = [models.QaExample(question=f"gen{i}") for i in range(6)]
        for r in rows:
            r["answer"] = rule_answer({"question": r.question})
        started = start.sync(client=c, body=models.QaOptimizationRequest(signature="qa", trainset=rows))
        # queued, or already running when the worker took it before the gateway read the record back
        assert isinstance(started, models.Run), started
        assert started.status in (models.RunStatus.QUEUED, models.RunStatus.RUNNING), started
        deadline = time.monotonic() + 60
        while (run := get_run.sync(started.run_id, client=c)).status not in (models.RunStatus.SUCCEEDED,
                                                                               models.RunStatus.FAILED):
            assert time.monotonic() < deadline, run
            time.sleep(0.2)
        assert run.stage is models.RunStage.DONE and isinstance(run.summary, models.RunSummary)
        assert run.summary.dry_run is True and isinstance(run.summary.usage, models.Usage)
        # the either-or rule is the server's: neither source, or both, is a 422 problem naming the field
        for body, field in ((models.QaOptimizationRequest(signature="qa"), "trainset"),
                            (models.QaOptimizationRequest(signature="qa", trainset=rows, dataset="gold"), "dataset")):
            refused = start.sync_detailed(client=c, body=body)
            assert refused.status_code == 422 and isinstance(refused.parsed, models.Problem), refused.content
            assert [e.field for e in refused.parsed.errors] == [field]
            assert refused.parsed.errors[0].pointer == f"/{field}"


def _npm_packages(cache: Path) -> Path:
    """A folder with the TypeScript check's npm packages (installed once into ``cache``)."""
    bin_dir = cache / "node_modules" / ".bin"
    if not (bin_dir / "tsc").exists() or not (bin_dir / "openapi-typescript").exists():
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(cache),
                               *TS_PACKAGES], capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
    return bin_dir


def _route_assertions(doc: dict[str, Any]) -> str:
    """One compile-time assertion per operation: its JSON request body and each JSON success body is typed
    (not any, unknown, never, nor an object that can hold nothing)."""
    lines = [
        'import type { operations } from "./gateway";',
        "type Expect<T extends true> = T;",
        "type IsAny<T> = 0 extends 1 & T ? true : false;",
        "type Typed<T> = IsAny<T> extends true ? false : unknown extends T ? false : [T] extends [never] ? false"
        " : [T] extends [Record<string, never>] ? false : true;",
        'type Json<R> = R extends { content: { "application/json": infer B } } ? B : never;',
        'type Body<O> = O extends { requestBody?: { content: { "application/json": infer B } } } ? B : never;',
    ]
    for i, (_path, _method, op) in enumerate(_operations(doc)):
        name = op["operationId"]
        if "application/json" in (op.get("requestBody") or {}).get("content", {}):
            lines.append(f'export type Request{i} = Expect<Typed<Body<operations["{name}"]>>>;')
        for code, response in op["responses"].items():
            if code.startswith("2") and "application/json" in (response.get("content") or {}):
                lines.append(f'export type Response{i}_{code} = Expect<Typed<Json<operations["{name}"]'
                             f'["responses"][{code}]>>>;')
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(not os.environ.get("DSPEX_TEST_TYPESCRIPT"),
                    reason="opt-in: DSPEX_TEST_TYPESCRIPT=1 installs openapi-typescript and typescript with npm")
@pytest.mark.skipif(shutil.which("npm") is None, reason="needs Node.js and npm")
def test_typescript_types_every_route(document: dict[str, Any], tmp_path: Path) -> None:
    bin_dir = _npm_packages(Path(os.environ.get("DSPEX_TEST_TYPESCRIPT_DIR", HERE.parents[1] / ".cache" / "ts-client")))
    (tmp_path / "openapi.json").write_text(json.dumps(document))
    generated = subprocess.run([str(bin_dir / "openapi-typescript"), "openapi.json", "-o", "gateway.d.ts"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert generated.returncode == 0, generated.stderr[-3000:]
    types = (tmp_path / "gateway.d.ts").read_text()
    # no object typed as one that can hold nothing (the document's own webhooks and $defs are empty)
    empty = [line.strip() for line in types.splitlines() if "Record<string, never>" in line]
    assert empty == ["export type webhooks = Record<string, never>;", "export type $defs = Record<string, never>;"]
    (tmp_path / "routes.ts").write_text(_route_assertions(document))
    shutil.copy(HERE / "gateway_types.ts", tmp_path / "usage.ts")
    checked = subprocess.run([str(bin_dir / "tsc"), "--strict", "--noEmit", "--target", "es2022", "--module",
                              "es2022", "--moduleResolution", "bundler", "routes.ts", "usage.ts"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False)
    assert checked.returncode == 0, checked.stdout[-6000:] + checked.stderr[-2000:]
