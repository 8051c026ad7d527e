"""The OpenAPI document: FastAPI's fixed routes plus one typed set of operations per published signature.

Each signature's published input and output JSON Schemas become components (``qa.inputs``,
``qa.outputs``) referenced by its operations, so a generated client has ``question: string`` rather than
``object``. Every protected operation documents its problem responses and the API-key security schemes, and
the right its key needs (``x-dspex-right``; its 403 says what a refusal names).
"""

from __future__ import annotations

import copy
import re
from typing import Any

from ..programs.store import PREDICTOR_KEYS, PROGRAM_KEYS, SINGLE_PREDICTOR_KEYS
from ..wire import MAX_TIMEOUT_S, lm_config_schema
from .problems import PROBLEM_JSON, PROBLEM_SCHEMA

__all__ = ["build_document", "PUBLIC", "JOB_SCHEMA", "JOB_EVENT_SCHEMA", "RUN_SCHEMA", "RUN_EVENT_SCHEMA",
           "SIGNATURE_SCHEMA", "ref", "sse_schema"]

PUBLIC = frozenset({"/healthz"})
_ERRORS = (400, 401, 403, 404, 413, 415, 422, 429, 503)
_RUN_ERRORS = (502, 504)
_DESCRIPTIONS = {400: "Malformed request", 401: "Missing or unknown API key", 403: "Forbidden",
                 404: "Not found (jobs and runs this key may not see answer 404 too, as if unknown)", 409: "The named program serves another signature",
                 413: "Request body too large", 415: "Unsupported media type",
                 422: "Validation failed (errors[].field names each bad field)", 429: "Rate limited",
                 502: "The job failed on the worker or the LM", 503: "Store unavailable", 504: "Timed out"}

NULLABLE_STR = {"anyOf": [{"type": "string"}, {"type": "null"}]}
ID_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": r"^[A-Za-z0-9._:-]+$"}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _result_schema(outputs: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "outputs": outputs, "session": NULLABLE_STR, "program": {"type": "string"},
            "program_version": {"type": "integer"}, "usage": {"type": "object"}, "lm": {"type": "string"},
            "duration_ms": {"type": "number"}, "worker": NULLABLE_STR, "task_id": NULLABLE_STR,
            "trace": {"type": "array", "items": ref("TraceEntry"),
                      "description": "with trace: true, each predictor call in order"},
        },
        "required": ["outputs", "program_version"],
    }


#: The per-request options of a job request (ARCHITECTURE 3.6); null is "not set", as for session and program.
OPTION_PROPERTIES: dict[str, Any] = {
    "trace": {"anyOf": [{"type": "boolean"}, {"type": "null"}], "default": False,
              "description": "the result carries 'trace': per predictor call, in order, its name (as the module's "
                             "named_predictors() names it), inputs and outputs (ChainOfThought reasoning included)"},
    "lm_config": {"anyOf": [lm_config_schema(), {"type": "null"}],
                  "description": "LM settings for every LM call of this job; only these keys (api_base, api_key, "
                                 "model and any other are refused)"},
    "stream": {"anyOf": [{"type": "boolean"}, {"type": "null"}], "default": False,
               "description": "the job writes live events (status, step, tool, token, then result or error): "
                              "follow them with GET /v1/jobs/{id}/events"},
    "timeout_s": {"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT_S}, {"type": "null"}],
                  "description": "the job's total time from now, queued time included: past it the job stops "
                                 "before its next LM call and fails as Cancelled (code 'cancelled')"},
}


def _job_schema(result: dict[str, Any], signature: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "id": {"type": "string"}, "signature": signature,
            "state": {"type": "string", "description": "PENDING, STARTED, RETRY, SUCCESS, FAILURE, ..."},
            "result": result, "error": ref("JobError"),
        },
        "required": ["id", "state", "signature"],
    }


JOB_SCHEMA = _job_schema(ref("Result"), NULLABLE_STR)
RUN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "An optimization run's record; summary once it succeeded.",
    "properties": {"run_id": {"type": "string"}, "status": {"type": "string"}, "stage": {"type": "string"},
                   "signature": {"type": "string"}, "summary": {"type": "object"}},
    "required": ["run_id", "status", "stage"],
}
SIGNATURE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "spec": {"type": "string"}, "module": {"type": "string"},
                   "instructions": {"type": "string"}, "input_fields": {"type": "object"},
                   "output_fields": {"type": "object"}, "input_schema": {"type": "object"},
                   "output_schema": {"type": "object"}},
    "required": ["name", "input_schema", "output_schema"],
}
_COMMON: dict[str, Any] = {
    "Problem": PROBLEM_SCHEMA,
    "JobError": {"type": "object", "properties": {
        "type": {"type": "string"}, "code": {"type": "string"}, "message": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object"}}}, "required": ["type", "code", "message"]},
    "TraceEntry": {"type": "object", "properties": {
        "predictor": {"type": "string"}, "inputs": {"type": "object"}, "outputs": {"type": "object"}},
        "required": ["predictor", "inputs", "outputs"]},
    "Result": _result_schema({"type": "object"}),
    "Job": JOB_SCHEMA,
    "Run": RUN_SCHEMA,
    "SignatureDescription": SIGNATURE_SCHEMA,
}


def sse_schema(data: dict[str, Any], events: list[str] | None = None) -> dict[str, Any]:
    """One Server-Sent Event (OpenAPI 3.2's convention for ``text/event-stream``): ``data`` is JSON."""
    event: dict[str, Any] = {"type": "string", "enum": events} if events else {"type": "string"}
    return {"type": "object", "properties": {
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
        "event": event, "id": {"type": "string"}, "retry": {"type": "integer"}}, "required": ["data"]}


RUN_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object", "properties": {"stage": {"type": "string"}, "done": {"type": "integer"},
                                     "total": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                                     "score": {"type": "number"}, "message": {"type": "string"},
                                     "ts": {"type": "number"}},
    "required": ["stage", "ts"]}


_NULLABLE_ID = {"anyOf": [{"type": "string"}, {"type": "null"}]}
JOB_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One live event of a job (the SSE event name is its type). status: {state: running | "
                   "retrying | requeued, attempt?}; step: a module or predictor {phase: start | end, name, kind: "
                   "module | predictor, error?}; tool: {phase: start, name, arguments} then {phase: end, name, "
                   "result | error}; token: {field, chunk, predictor, reset?} (the chunks of a field since its last "
                   "reset, joined, equal that field of the result); last result {result} or error {error}. A job "
                   "that wrote no live event also gets state: {state} (its Celery state) on each change.",
    "properties": {
        "type": {"type": "string", "enum": ["status", "step", "tool", "token", "result", "error", "state"]},
        "id": {**_NULLABLE_ID, "description": "the stream entry id (also the SSE id); null for a state event and "
                                              "for a final event built from the stored result"},
        "ts": {"type": "number", "description": "unix seconds"},
        "state": {"type": "string"}, "attempt": {"type": "integer"},
        "phase": {"type": "string", "enum": ["start", "end"]}, "name": {"type": "string"},
        "kind": {"type": "string", "enum": ["module", "predictor"]},
        "arguments": {"type": "object"}, "field": {"type": "string"}, "chunk": {"type": "string"},
        "predictor": {"type": ["string", "null"],
                      "description": "the predictor that streamed the chunk; null for a chunk that was not streamed "
                                     "(a cache hit, or the rest of the final value)"},
        "reset": {"type": "boolean"},
        "result": {"description": "result: the job's result, as GET /v1/jobs/{id} shows it; tool: the tool's",
                   "anyOf": [ref("Result"), {}]},
        "error": {"description": "error: the job's error; step and tool: what the step or tool raised",
                  "anyOf": [{"type": "object", "properties": {
                      "type": {"type": "string"}, "code": _NULLABLE_ID, "message": {"type": "string"},
                      "errors": {"type": "array", "items": {"type": "object"}}}, "required": ["type", "message"]},
                      {"type": "string"}]},
    },
    "required": ["type"],
}


def _embed(schema: dict[str, Any], prefix: str, components: dict[str, Any]) -> dict[str, Any]:
    """A published schema as a component: ``$schema`` dropped, ``$defs`` moved out, their refs rewritten."""
    schema = copy.deepcopy(schema)
    schema.pop("$schema", None)
    defs = schema.pop("$defs", {}) or {}
    names = {name: f"{prefix}.{re.sub(r'[^A-Za-z0-9._-]', '_', name)}" for name in defs}

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            target = node.get("$ref")
            if isinstance(target, str) and target.startswith("#/$defs/") and target[8:] in names:
                node = {**node, "$ref": f"#/components/schemas/{names[target[8:]]}"}
            return {k: rewrite(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for name, sub in defs.items():
        components[names[name]] = rewrite(sub)
    return dict(rewrite(schema))


def _problem(code: int) -> dict[str, Any]:
    out: dict[str, Any] = {"description": _DESCRIPTIONS.get(code, "Error"),
                           "content": {PROBLEM_JSON: {"schema": ref("Problem")}}}
    if code == 429:
        out["headers"] = {"Retry-After": {"description": "seconds until a request is allowed",
                                          "schema": {"type": "integer"}}}
    return out


_RIGHT_USES = {
    "read": "the key's 'read' right and, for a session the request names, that session in its scope",
    "write": "the key's 'write' right and the session the request names (or '@default', the default program, "
             "when it names none) in its scope",
    "admin": "the key's 'admin' right",
}


def _forbidden(right: str) -> dict[str, Any]:
    out = _problem(403)
    out["description"] = (f"Forbidden: this operation needs {_RIGHT_USES.get(right, repr(right))}. The problem "
                          "names what is missing ('right', 'session' or 'dataset') and the 'dspex keys grant' "
                          "command that grants it")
    return out


def _right_of(rights: dict[tuple[str, str], str], method: str, path: str) -> str | None:
    """The right of an operation; a signature's own paths take their parameterized route's."""
    found = rights.get((method.upper(), path))
    if found is None and path.startswith("/v1/signatures/"):
        found = rights.get((method.upper(), re.sub(r"^/v1/signatures/[^/:]+", "/v1/signatures/{name}", path)))
    return found


def _json(schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}, **extra}


_LOCATION = {"Location": {"description": "the job resource", "schema": {"type": "string"}}}


def _job_links(name: str) -> dict[str, Any]:
    job = {"job_id": "$response.body#/id"}
    return {"typed": {"operationId": f"get_{name}_job", "parameters": job},
            "job": {"operationId": "get_job", "parameters": job},
            "events": {"operationId": "job_stream", "parameters": job},
            "cancel": {"operationId": "cancel_job", "parameters": job}}


def _add_links(doc: dict[str, Any]) -> None:
    """Links between fixed operations (the job links are set per signature): for generated clients and tests."""
    program = {"session": "$request.path.session", "program": "$request.path.program"}
    run = {"run_id": "$response.body#/run_id"}
    wanted = {
        ("/v1/sessions/{session}/programs/{program}", "put", "200"): {
            "get": {"operationId": "get_program", "parameters": program},
            "history": {"operationId": "program_history", "parameters": program},
            "rollback": {"operationId": "rollback_program", "parameters": program,
                         "requestBody": {"version": "$response.body#/version"}},
            "delete": {"operationId": "delete_program", "parameters": program}},
        ("/v1/optimizations", "post", "202"): {
            "get": {"operationId": "get_optimization", "parameters": run},
            "cancel": {"operationId": "cancel_optimization", "parameters": run},
            "events": {"operationId": "optimization_events", "parameters": run}},
    }
    for (path, method, status), links in wanted.items():
        response = doc["paths"].get(path, {}).get(method, {}).get("responses", {}).get(status)
        if response is not None:
            response["links"] = links


def _signature_paths(name: str) -> dict[str, Any]:
    c = f"{name}."
    tag = ["signatures"]
    body = {"required": True, "content": {"application/json": {"schema": ref(c + "job_request")}}}
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": ID_SCHEMA}
    timeout = {"name": "timeout", "in": "query", "required": False,
               "description": "seconds to wait for the result before answering 202 with the pending job",
               "schema": {"type": "number", "minimum": 0, "maximum": 300, "default": 30}}
    return {
        f"/v1/signatures/{name}": {"get": {
            "operationId": f"describe_{name}", "summary": f"Describe signature {name}", "tags": tag,
            "responses": {"200": _json(ref("SignatureDescription"), "The published description")}}},
        f"/v1/signatures/{name}/jobs": {"post": {
            "operationId": f"submit_{name}", "summary": f"Submit a {name} job", "tags": tag, "requestBody": body,
            "responses": {"202": _json(ref(c + "job"), "Accepted; poll the job or follow its events",
                                       headers=_LOCATION, links=_job_links(name))}}},
        f"/v1/signatures/{name}/jobs/{{job_id}}": {"get": {
            "operationId": f"get_{name}_job", "summary": f"A {name} job's state and typed result", "tags": tag,
            "parameters": [job_id],
            "responses": {"200": _json(ref(c + "job"), "The job")}}},
        f"/v1/signatures/{name}:run": {"post": {
            "operationId": f"run_{name}", "summary": f"Run {name} and wait for the result", "tags": tag,
            "parameters": [timeout], "requestBody": body,
            "responses": {"200": _json(ref(c + "job"), "Done: the job with its result", links=_job_links(name)),
                          "202": _json(ref(c + "job"), "Still running at the timeout", headers=_LOCATION,
                                       links=_job_links(name))}}},
    }


def _signature_components(name: str, desc: dict[str, Any], components: dict[str, Any]) -> None:
    c = f"{name}."
    components[c + "inputs"] = _embed(desc["input_schema"], c + "inputs", components)
    components[c + "outputs"] = _embed(desc["output_schema"], c + "outputs", components)
    components[c + "job_request"] = {
        "type": "object", "title": f"{name} job request",
        "properties": {"inputs": ref(c + "inputs"), "session": {"anyOf": [ID_SCHEMA, {"type": "null"}]},
                       "program": {"anyOf": [ID_SCHEMA, {"type": "null"}]}, **copy.deepcopy(OPTION_PROPERTIES)},
        "required": ["inputs"], "additionalProperties": False,
    }
    components[c + "result"] = _result_schema(ref(c + "outputs"))
    components[c + "job"] = _job_schema(ref(c + "result"), {"type": "string", "const": name})


def _optimization_components(name: str, desc: dict[str, Any], caps: dict[str, list[str]],
                             components: dict[str, Any]) -> None:
    """A run request for one signature: rows typed by its schemas, names from the workers' capabilities."""
    from ..optimize.datasets import MAX_ROWS, example_schema

    c = f"{name}."
    row = _embed(example_schema(desc), c + "example", components)
    outputs = list((desc.get("output_schema") or {}).get("properties") or {})
    if outputs:
        row["anyOf"] = [{"required": [o]} for o in outputs]  # at least one label
    row["title"] = f"{name} example"
    components[c + "example"] = row
    rows = {"anyOf": [{"type": "array", "maxItems": MAX_ROWS, "items": ref(c + "example")}, {"type": "null"}]}
    nullable_id = {"anyOf": [ID_SCHEMA, {"type": "null"}]}

    def named(kind: str, default: str) -> dict[str, Any]:
        known = caps.get(f"{kind}s")
        if known:
            return {"type": "string", "enum": list(known), "default": default}
        return {**ID_SCHEMA, "default": default}

    components[c + "optimization_request"] = {
        "type": "object", "title": f"{name} optimization request",
        "properties": {"signature": {"type": "string", "const": name}, "trainset": rows, "valset": rows,
                       "metric": named("metric", "exact_match"), "optimizer": named("optimizer", "bootstrap_few_shot"),
                       "session": nullable_id, "program": nullable_id,
                       "params": {"anyOf": [{"type": "object"}, {"type": "null"}]}, "dataset": nullable_id},
        "required": ["signature"], "additionalProperties": False,
        "oneOf": [  # a trainset or a dataset, not both
            {"required": ["trainset"], "properties": {"trainset": {"type": "array"}, "dataset": {"type": "null"}}},
            {"required": ["dataset"], "properties": {"dataset": {"type": "string"}, "trainset": {"type": "null"}}}],
    }
    params = _optimizer_params(caps, components)
    if params:
        components[c + "optimization_request"]["allOf"] = params


def _optimizer_params(caps: dict[str, Any], components: dict[str, Any]) -> list[dict[str, Any]]:
    """``params`` typed by the chosen optimizer (the schemas workers publish): one if/then per optimizer."""
    schemas = caps.get("optimizer_params")
    if not isinstance(schemas, dict) or not schemas:
        return []
    out = []
    for opt in sorted(schemas):
        target = f"optimizers.{re.sub(r'[^A-Za-z0-9._-]', '_', opt)}.params"
        components[target] = _embed(schemas[opt], target, components)
        params = {"properties": {"params": {"anyOf": [ref(target), {"type": "null"}]}}}
        when: dict[str, Any] = {"properties": {"optimizer": {"const": opt}}, "required": ["optimizer"]}
        if opt == "bootstrap_few_shot":  # the default optimizer
            when = {"anyOf": [when, {"not": {"required": ["optimizer"]}}]}
        out.append({"if": when, "then": params})
    return out


def _program_state_schema() -> dict[str, Any]:
    """Program state a signature's module (one predictor) loads: its state at the top level or under
    ``self``/``predict``; another key holding an object would be a predictor the module does not have."""
    demos = {"type": "array", "items": {"type": "object"}}
    props: dict[str, Any] = {k: {"properties": {"demos": demos}} for k in sorted(PREDICTOR_KEYS | PROGRAM_KEYS)}
    props.update({"demos": demos, "instructions": {"type": "string"}, **dict.fromkeys(SINGLE_PREDICTOR_KEYS,
                                                  {"type": "object", "properties": {"demos": demos}})})
    return {"type": "object", "description": "DSPy dump_state() JSON, or {demos, instructions}. A program "
            "with several predictors takes one entry per predictor (the names GET /v1/signatures lists under "
            "'predictors'); this schema describes the one-predictor form",
            "properties": props, "additionalProperties": {"not": {"type": "object"}}}


def _typed_fixed_bodies(doc: dict[str, Any], signatures: dict[str, dict[str, Any]]) -> None:
    """Fixed routes whose bodies name a signature: only published names, rows typed by signature."""
    schemas = doc["components"]["schemas"]
    names = sorted(signatures)
    if not names:
        return
    put = schemas.get("ProgramPut")
    if put is not None:
        put["properties"]["signature"] = {"anyOf": [{"type": "string", "enum": names}, {"type": "null"}]}
        put["properties"]["state"] = _program_state_schema()
    op = doc["paths"].get("/v1/optimizations", {}).get("post")
    if op is not None:
        op["requestBody"]["content"]["application/json"]["schema"] = {
            "oneOf": [ref(f"{n}.optimization_request") for n in names],
            "discriminator": {"propertyName": "signature",
                              "mapping": {n: f"#/components/schemas/{n}.optimization_request" for n in names}}}


def build_document(base: dict[str, Any], signatures: dict[str, dict[str, Any]],
                   capabilities: dict[str, list[str]] | None = None,
                   rights: dict[tuple[str, str], str] | None = None) -> dict[str, Any]:
    """``base`` (FastAPI's document of the fixed routes) with every signature's operations and the problems.

    ``rights`` (``(METHOD, path template) -> right``, from :func:`.routers.access.route_rights`) marks each
    operation with ``x-dspex-right`` and says in its 403 what it needs.
    """
    doc = copy.deepcopy(base)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(copy.deepcopy(_COMMON))
    paths: dict[str, Any] = {}
    for name in sorted(signatures):
        _signature_components(name, signatures[name], schemas)
        _optimization_components(name, signatures[name], capabilities or {}, schemas)
        paths.update(_signature_paths(name))
    paths.update(doc.get("paths", {}))
    doc["paths"] = paths
    _typed_fixed_bodies(doc, signatures)
    _add_links(doc)
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    doc["security"] = [{"bearer": []}, {"apiKey": []}]
    for path, item in paths.items():
        for method, op in item.items():
            if method not in {"get", "post", "put", "delete", "patch"}:
                continue
            responses = op.setdefault("responses", {})
            if path in PUBLIC:
                op["security"] = []
                continue
            codes = _ERRORS + (_RUN_ERRORS if path.endswith(":run") else ())
            if path.startswith("/v1/signatures/") and method == "post":
                codes += (409,)
            for code in codes:
                responses[str(code)] = _problem(code)
            right = _right_of(rights or {}, method, path)
            if right is not None:
                op["x-dspex-right"] = right
                responses["403"] = _forbidden(right)
    return doc
