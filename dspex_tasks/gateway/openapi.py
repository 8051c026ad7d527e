"""The OpenAPI document: FastAPI's fixed routes plus one typed set of operations per published signature.

Each signature's published input and output JSON Schemas become components (``qa.inputs``,
``qa.outputs``) referenced by its operations, so a generated client has ``question: string`` rather than
``object``. Every protected operation documents its problem responses and the API-key security schemes, and
the right its key needs (``x-dspex-right``; its 403 says what a refusal names).

The document is written for client generators (``openapi-python-client``, ``openapi-typescript``; both run
against it in the tests) as much as for validators: rules between fields (a trainset or a dataset; params by
optimizer) are ``if``/``then``/``else``, which validators apply and generators skip, never a ``oneOf`` of
partial shapes that a generator cannot type; and request bodies state their defaults in words (see
:func:`_defaults_in_words`).
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from ..programs.store import PREDICTOR_KEYS, PROGRAM_KEYS, SINGLE_PREDICTOR_KEYS
from ..wire import MAX_TIMEOUT_S, lm_config_schema
from .models import OPEN_OBJECT, RESPONSE_SCHEMAS, job_schema, ref, result_schema
from .problems import PROBLEM_JSON, PROBLEM_SCHEMA

__all__ = ["build_document", "PUBLIC", "OPTION_PROPERTIES", "ref"]

PUBLIC = frozenset({"/healthz"})
_ERRORS = (400, 401, 403, 404, 413, 415, 422, 429, 503)
_RUN_ERRORS = (502, 504)
_DESCRIPTIONS = {400: "Malformed request", 401: "Missing or unknown API key", 403: "Forbidden",
                 404: "Not found (jobs and runs this key may not see answer 404 too, as if unknown)", 409: "The named program serves another signature",
                 413: "Request body too large", 415: "Unsupported media type",
                 422: "Validation failed (errors[].field names each bad field)", 429: "Rate limited",
                 502: "The job failed on the worker or the LM", 503: "Store unavailable", 504: "Timed out"}

ID_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": r"^[A-Za-z0-9._:-]+$"}
_NULLABLE_ID: dict[str, Any] = {"anyOf": [ID_SCHEMA, {"type": "null"}]}


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
                              "follow them with GET /v1/jobs/{job_id}/events"},
    "timeout_s": {"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT_S}, {"type": "null"}],
                  "description": "the job's total time from now, queued time included: past it the job stops "
                                 "before its next LM call and fails as Cancelled (code 'cancelled')"},
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
        components[names[name]] = _nest_conditions(rewrite(sub))
    return _nest_conditions(dict(rewrite(schema)))


_CONDITION_KEYS = frozenset({"if", "then", "else"})


def _nest_conditions(schema: dict[str, Any]) -> dict[str, Any]:
    """``allOf`` of conditions only (``[{if, then}, ...]``) as one nested ``if``/``then``/``else``: the same
    rules, where openapi-typescript would write each ``allOf`` member as ``unknown``. Each condition's branches
    take the ones after it (``C1 and R`` is ``if P1 then Q1 and R else R1 and R``)."""
    conditions = schema.get("allOf")
    if (not conditions or _CONDITION_KEYS & schema.keys()
            or not all(isinstance(c, dict) and "if" in c and c.keys() <= _CONDITION_KEYS for c in conditions)):
        return schema
    rest: dict[str, Any] = {}
    for c in reversed(conditions):
        then, other = c.get("then", {}), c.get("else", {})
        if rest.keys() & (then.keys() | other.keys()):
            return schema  # the branches would share a keyword: keep the allOf
        rest = {"if": c["if"], "then": {**then, **rest}, **({"else": {**other, **rest}} if other or rest else {})}
    return {**{k: v for k, v in schema.items() if k != "allOf"}, **rest}


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
        "properties": {"inputs": ref(c + "inputs"), "session": copy.deepcopy(_NULLABLE_ID),
                       "program": copy.deepcopy(_NULLABLE_ID), **copy.deepcopy(OPTION_PROPERTIES)},
        "required": ["inputs"], "additionalProperties": False,
    }
    components[c + "result"] = result_schema(ref(c + "outputs"))
    components[c + "job"] = job_schema(ref(c + "result"), {"type": "string", "const": name})


def _optimization_components(name: str, desc: dict[str, Any], caps: dict[str, Any],
                             components: dict[str, Any]) -> None:
    """A run request for one signature: rows typed by its schemas, names from the workers' capabilities.

    One object: ``trainset`` and ``dataset`` are both optional to a generated client, and the gateway answers
    422 naming the field when a request gives neither or both; the same rule, and ``params`` by optimizer,
    are ``if``/``then``/``else`` for validators (:func:`_request_rules`).
    """
    from ..optimize.datasets import MAX_ROWS, example_schema

    c = f"{name}."
    row = _embed(example_schema(desc), c + "example", components)  # inputs typed, any other field a label
    row["title"] = f"{name} example"
    row["description"] = ("A row: the signature's inputs, typed, and any other field a label the metric "
                          "reads (usually the outputs it should produce)")
    components[c + "example"] = row
    rows = {"anyOf": [{"type": "array", "maxItems": MAX_ROWS, "items": ref(c + "example")}, {"type": "null"}]}

    def named(kind: str, default: str) -> dict[str, Any]:
        known = caps.get(f"{kind}s")
        if known:
            return {"type": "string", "enum": list(known), "default": default}
        return {**ID_SCHEMA, "default": default}

    params, rules = _optimizer_params(caps, components)
    components[c + "optimization_request"] = {
        "type": "object", "title": f"{name} optimization request",
        "description": "Give a trainset or a dataset (a stored one's name), not both: otherwise the answer is "
                       "422 naming 'trainset' or 'dataset'.",
        "properties": {
            "signature": {"type": "string", "const": name},
            "trainset": {**rows, "description": "the rows to optimize on (or name a dataset)"},
            "valset": {**rows, "description": "rows to score on; without it params.val_fraction of the "
                                              "trainset is held out"},
            "metric": named("metric", "exact_match"), "optimizer": named("optimizer", "bootstrap_few_shot"),
            "session": {**_NULLABLE_ID, "description": "promote the candidate here when it wins; none: a dry "
                                                       "run"},
            "program": copy.deepcopy(_NULLABLE_ID),
            "params": {**params, "description": "the optimizer's params (optimizers.<name>.params describes "
                                                "each); an unknown key is a 422 naming it"},
            "dataset": {**_NULLABLE_ID, "description": "the name of a stored dataset, instead of a trainset"}},
        "required": ["signature"], "additionalProperties": False,
        **_request_rules(rules),
    }


def _optimizer_params(caps: dict[str, Any], components: dict[str, Any]
                      ) -> tuple[dict[str, Any], list[tuple[dict[str, Any], dict[str, Any]]]]:
    """``params``'s schema (any published optimizer's params, or null) and one (if, then) per optimizer that
    types them by the chosen one (the schemas workers publish)."""
    schemas = caps.get("optimizer_params")
    if not isinstance(schemas, dict) or not schemas:
        return {"anyOf": [dict(OPEN_OBJECT), {"type": "null"}]}, []
    members: list[dict[str, Any]] = []
    rules = []
    for opt in sorted(schemas):
        target = f"optimizers.{re.sub(r'[^A-Za-z0-9._-]', '_', opt)}.params"
        components[target] = _embed(schemas[opt], target, components)
        members.append(ref(target))
        when: dict[str, Any] = {"properties": {"optimizer": {"const": opt}}, "required": ["optimizer"]}
        if opt == "bootstrap_few_shot":  # the default optimizer
            when = {"anyOf": [when, {"not": {"required": ["optimizer"]}}]}
        rules.append((when, {"properties": {"params": {"anyOf": [ref(target), {"type": "null"}]}}}))
    if set(caps.get("optimizers") or ()) - set(schemas):  # an optimizer that published no params schema
        members.append(dict(OPEN_OBJECT))
    return {"anyOf": [*members, {"type": "null"}]}, rules


def _request_rules(params: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """A trainset or a dataset, and then ``params`` by optimizer, as nested ``if``/``then``/``else``."""
    chain: dict[str, Any] = {}
    for when, then in reversed(params):  # mutually exclusive: each one's else holds the next
        chain = {"if": when, "then": then, **({"else": chain} if chain else {})}
    return {"if": {"required": ["dataset"], "properties": {"dataset": {"type": "string"}}},
            "then": {"properties": {"trainset": {"type": "null"}}, **copy.deepcopy(chain)},
            "else": {"required": ["trainset"], "properties": {"trainset": {"type": "array"}}, **chain}}


def _program_state_schema() -> dict[str, Any]:
    """Program state a signature's module (one predictor) loads: its state at the top level or under
    ``self``/``predict``; another key holding an object would be a predictor the module does not have."""
    demos = {"type": "array", "items": dict(OPEN_OBJECT)}  # a demo: inputs and outputs, named by the signature
    props: dict[str, Any] = {k: {"properties": {"demos": demos}} for k in sorted(PREDICTOR_KEYS | PROGRAM_KEYS)}
    props.update({"demos": demos, "instructions": {"type": "string"}, **dict.fromkeys(
        SINGLE_PREDICTOR_KEYS, {"type": "object", "properties": {"demos": demos}, "additionalProperties": True})})
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
    if op is not None:  # a typed union: each member is one object, told apart by its signature
        op["requestBody"]["content"]["application/json"]["schema"] = {
            "oneOf": [ref(f"{n}.optimization_request") for n in names],
            "discriminator": {"propertyName": "signature",
                              "mapping": {n: f"#/components/schemas/{n}.optimization_request" for n in names}}}
        schemas.pop("OptimizationRequest", None)  # FastAPI's untyped model, referenced no more


def _subschemas(node: dict[str, Any]) -> list[dict[str, Any]]:
    """The schemas directly inside a schema (a property named "default" is a schema, not a default)."""
    out = [node[k] for k in ("items", "additionalProperties", "not", "if", "then", "else", "contentSchema")
           if isinstance(node.get(k), dict)]
    for k in ("anyOf", "oneOf", "allOf", "prefixItems"):
        out += [v for v in node.get(k) or [] if isinstance(v, dict)]
    for k in ("properties", "patternProperties", "$defs", "dependentSchemas"):
        out += [v for v in (node.get(k) or {}).values() if isinstance(v, dict)]
    return out


def _defaults_in_words(doc: dict[str, Any]) -> None:
    """Every request body's defaults (and the components it references) said in the description.

    openapi-typescript types a property with a ``default`` as always present, in a request too
    (openapi-ts/openapi-typescript#2012), so ``{"inputs": {...}}`` would not type-check without ``trace``,
    ``stream`` and every optimizer param. A default is the server's business: the body may leave it out.
    """
    schemas = doc["components"]["schemas"]
    todo = [media["schema"] for item in doc["paths"].values() for op in item.values() if isinstance(op, dict)
            for media in (op.get("requestBody") or {}).get("content", {}).values() if "schema" in media]
    seen: set[str] = set()
    while todo:
        node = todo.pop()
        target = node.get("$ref")
        if isinstance(target, str) and target.startswith("#/components/schemas/"):
            name = target.rsplit("/", 1)[1]
            if name not in seen and name in schemas:
                seen.add(name)
                todo.append(schemas[name])
        if "default" in node:
            default = node.pop("default")
            if default is not None:
                said = f"Default: {json.dumps(default)}."
                node["description"] = f"{node['description'].rstrip('.')}. {said}" if node.get("description") else said
        todo += _subschemas(node)


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
    schemas.update(copy.deepcopy({"Problem": PROBLEM_SCHEMA, **RESPONSE_SCHEMAS}))
    paths: dict[str, Any] = {}
    for name in sorted(signatures):
        _signature_components(name, signatures[name], schemas)
        _optimization_components(name, signatures[name], capabilities or {}, schemas)
        paths.update(_signature_paths(name))
    paths.update(doc.get("paths", {}))
    doc["paths"] = paths
    _typed_fixed_bodies(doc, signatures)
    _defaults_in_words(doc)
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
