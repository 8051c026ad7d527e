"""Request and response bodies of the gateway's fixed routes (the per-signature ones come from the schemas).

Pydantic models where FastAPI validates the body; JSON Schemas (:data:`RESPONSE_SCHEMAS`, components of the
OpenAPI document) for the JSON the routes build themselves: jobs, results, runs, signatures and the events of
the two Server-Sent Events streams. Every object has its properties, or says ``additionalProperties: true``
where its keys are data (outputs, labels, usage a provider adds): a generated client then types it as a map
rather than as an empty object. Every state is an enum.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ..optimize.runs import RunStatus, Stage
from .checks import integral

__all__ = [
    "ID_PATTERN", "RUN_ID_PATTERN", "IdPath", "JobIdPath", "RunIdPath", "ProgramPut", "ProgramVersion", "ProgramOut", "Names",
    "ProgramHistory", "Rollback", "OptimizationRequest", "RunList", "Health",
    "JOB_STATES", "LIVE_STATES", "JOB_EVENT_TYPES", "OPEN_OBJECT", "RESPONSE_SCHEMAS", "how_to_follow", "job_schema",
    "ref", "result_schema", "sse_item_schema",
]

# keys.check_id's alphabet; lengths apart so that no regex flavour's "$" lets a trailing newline through.
ID_PATTERN = r"^[A-Za-z0-9._:-]+$"
# keys.check_id's run pattern (what RunStore.create generates); the length is given apart, as above.
RUN_ID_PATTERN = r"^[0-9a-f]+$"

IdPath = Annotated[str, Path(min_length=1, max_length=128, pattern=ID_PATTERN)]
JobIdPath = Annotated[str, Path(min_length=1, max_length=128, pattern=ID_PATTERN, description="a job id")]
RunIdPath = Annotated[str, Path(min_length=32, max_length=32, pattern=RUN_ID_PATTERN,
                                description="a run id (32 lowercase hex characters)")]
IdField = Annotated[str, Field(min_length=1, max_length=128, pattern=ID_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ProgramPut(_Strict):
    """A new version of a program: DSPy ``dump_state()`` JSON."""

    state: dict[str, Any]
    signature: IdField | None = None


class ProgramVersion(BaseModel):
    session: str
    program: str
    version: int


class ProgramOut(BaseModel):
    session: str
    program: str
    version: int
    signature: str | None
    updated_at: float
    state: dict[str, Any]


class Names(BaseModel):
    items: list[str]


class ProgramHistory(BaseModel):
    """A program's stored versions (not named ``Versions``: openapi-python-client's ``from_dict`` would name its
    result and its ``versions`` field alike, and mypy refuses the generated model)."""

    session: str
    program: str
    versions: list[int]


class Rollback(_Strict):
    version: Annotated[int, BeforeValidator(integral)] = Field(ge=1)


class OptimizationRequest(_Strict):
    """Start an optimization run (rows are validated against the signature before anything runs).

    Give a ``trainset`` or a ``dataset`` (a stored one's name), not both: the run answers 422 naming the field
    otherwise. The rule is the server's, not a ``oneOf`` in the schema, so generated clients type one object.
    """

    signature: IdField
    trainset: list[dict[str, Any]] | None = None
    valset: list[dict[str, Any]] | None = None
    metric: IdField = "exact_match"
    optimizer: IdField = "bootstrap_few_shot"
    session: IdField | None = None
    program: IdField | None = None
    params: dict[str, Any] | None = None
    dataset: IdField | None = None


class RunList(BaseModel):
    items: list[str]


class Health(BaseModel):
    status: str
    signatures: int


# -- JSON Schemas of the bodies the routes build ---------------------------------------------------------------
def ref(name: str) -> dict[str, str]:
    """A reference to the component schema ``name``."""
    return {"$ref": f"#/components/schemas/{name}"}


#: An object whose keys are data: any JSON under any name.
OPEN_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}
_NULLABLE_STR: dict[str, Any] = {"anyOf": [{"type": "string"}, {"type": "null"}]}
_NULLABLE_NUMBER: dict[str, Any] = {"anyOf": [{"type": "number"}, {"type": "null"}]}
_ANY_JSON: dict[str, Any] = {"description": "any JSON value"}

#: Every state a job reports: Celery's (``celery.states.ALL_STATES``, and REJECTED) and PROGRESS, which a
#: running job sets (the step it is at) as an optimization stage does. A generated client's enum refuses a value
#: it does not list, so none may be missing (a unit test holds this list to Celery's).
JOB_STATES = ("PENDING", "RECEIVED", "STARTED", "PROGRESS", "RETRY", "SUCCESS", "FAILURE", "REVOKED", "REJECTED")
#: The ``state`` of a live ``status`` event (ARCHITECTURE 3.6).
LIVE_STATES = ("running", "retrying", "requeued")

FIELD_ERROR: dict[str, Any] = {
    "type": "object", "description": "One invalid field: its dotted path and what is wrong with it",
    "properties": {"field": {"type": "string"}, "message": {"type": "string"},
                   "pointer": {"type": "string", "description": "a JSON pointer into the request body"}},
    "required": ["field", "message"]}
USAGE: dict[str, Any] = {
    "type": "object", "description": "What the job's LM calls used (cache hits cost nothing)",
    "properties": {"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
                   "total_tokens": {"type": "integer"}, "cost_usd": {"type": "number"},
                   "cost_known": {"type": "boolean", "description": "false: a model had no price"},
                   "lm_calls": {"type": "integer"}, "cache_hits": {"type": "integer"}},
    "additionalProperties": True}
TRACE_ENTRY: dict[str, Any] = {
    "type": "object", "properties": {"predictor": {"type": "string"}, "inputs": OPEN_OBJECT, "outputs": OPEN_OBJECT},
    "required": ["predictor", "inputs", "outputs"]}
JOB_ERROR: dict[str, Any] = {
    "type": "object", "properties": {
        "type": {"type": "string", "description": "the error class (errors.*)"},
        "code": {"type": "string", "description": "its stable code"}, "message": {"type": "string"},
        "errors": {"type": "array", "items": ref("FieldError")}},
    "required": ["type", "code", "message"]}


def result_schema(outputs: dict[str, Any]) -> dict[str, Any]:
    """A job's result with these ``outputs`` (a signature's own, or any object)."""
    return {
        "type": "object",
        "properties": {
            "outputs": outputs, "session": _NULLABLE_STR, "program": {"type": "string"},
            "program_version": {"type": "integer"}, "usage": ref("Usage"), "lm": {"type": "string"},
            "duration_ms": {"type": "number"}, "worker": _NULLABLE_STR, "task_id": _NULLABLE_STR,
            "trace": {"type": "array", "items": ref("TraceEntry"),
                      "description": "with trace: true, each predictor call in order"},
        },
        "required": ["outputs", "program_version"],
    }


def job_schema(result: dict[str, Any], signature: dict[str, Any]) -> dict[str, Any]:
    """A job as the API shows it: the result once it succeeded, the error once it failed."""
    return {
        "type": "object",
        "properties": {"id": {"type": "string"}, "signature": signature, "state": ref("JobState"),
                       "result": result, "error": ref("JobError")},
        "required": ["id", "state", "signature"],
    }


JOB_SUMMARY: dict[str, Any] = {
    "type": "object", "description": "A job submitted through the gateway or the console, as a list shows it (its "
                                     "result: GET /v1/jobs/{job_id})",
    "properties": {"id": {"type": "string"}, "signature": {"type": "string"},
                   "session": {**_NULLABLE_STR, "description": "null: the default program"},
                   "created_at": {"type": "number", "description": "submitted at, unix seconds"},
                   "state": ref("JobState")},
    "required": ["id", "signature", "session", "created_at", "state"]}
JOB_LIST: dict[str, Any] = {
    "type": "object", "description": "Recent jobs, newest first",
    "properties": {"jobs": {"type": "array", "items": ref("JobSummary")}}, "required": ["jobs"]}
RUN_SUMMARY: dict[str, Any] = {
    "type": "object", "description": "What a run found and did (once it succeeded)",
    "properties": {
        "run_id": {"type": "string"}, "baseline_score": {"type": "number"}, "score": {"type": "number"},
        "promoted": {"type": "boolean"}, "program_version": {"type": "integer"}, "optimizer": {"type": "string"},
        "lm_calls": {"type": "integer"}, "usage": ref("Usage"), "reason": {"type": "string"},
        "trials": {"type": "array", "items": {"type": "number"}},
        "dry_run": {"type": "boolean", "description": "no session: nothing was promoted"},
        "duration_s": {"type": "number"}, "gain": {"type": "number"},
        "gain_ci": {"anyOf": [{"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
                              {"type": "null"}], "description": "the gain's paired bootstrap interval"},
        "confidence": {"type": "number"}, "confidence_required": {"type": "boolean"},
        "n_val": {"type": "integer"}, "min_gain": {"type": "number"}},
    "additionalProperties": True}
RUN: dict[str, Any] = {
    "type": "object",
    "description": "An optimization run's record; summary once it succeeded, error once it failed. Fields a "
                   "newer worker adds come along (additionalProperties).",
    "properties": {
        "run_id": {"type": "string"}, "status": ref("RunStatus"), "stage": ref("RunStage"),
        "created_at": {"type": "number", "description": "unix seconds"}, "signature": {"type": "string"},
        "session": {"type": "string", "description": "empty for a dry run"}, "program": {"type": "string"},
        "optimizer": {"type": "string"}, "metric": {"type": "string"}, "params": OPEN_OBJECT,
        "dataset": {"type": "string"}, "scheduled": {"type": "boolean"}, "schedule": {"type": "string"},
        "lm_calls": {"type": "integer"}, "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"}, "cost_usd": {"type": "number"},
        "best_score": _NULLABLE_NUMBER, "baseline_score": {"type": "number"}, "candidate_score": {"type": "number"},
        "started_at": {"type": "number"}, "finished_at": {"type": "number"}, "cancel_requested": {"type": "boolean"},
        "trials": {"type": "array", "items": {"type": "number"}}, "summary": ref("RunSummary"),
        "error": {"type": "object", "properties": {"type": {"type": "string"},
                                                   "args": {"type": "array", "items": _ANY_JSON}},
                  "additionalProperties": True}},
    "required": ["run_id", "status", "stage"],
    "additionalProperties": True,
}
RUN_EVENT: dict[str, Any] = {
    "type": "object", "description": "One progress event of a run; the last has stage done, failed or cancelled",
    "properties": {"stage": ref("RunStage"), "done": {"type": "integer"},
                   "total": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                   "score": {"type": "number"}, "message": {"type": "string"},
                   "ts": {"type": "number", "description": "unix seconds"}},
    "required": ["stage", "ts"], "additionalProperties": True}
SIGNATURE_DESCRIPTION: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "kind": {"type": "string", "enum": ["signature", "program"]},
        "spec": {"type": "string"}, "module": {"type": "string"}, "instructions": {"type": "string"},
        "input_fields": {"type": "object", "additionalProperties": {"type": "string"},
                         "description": "field name -> its type, as the signature spells it"},
        "output_fields": {"type": "object", "additionalProperties": {"type": "string"}},
        "input_schema": {**OPEN_OBJECT, "description": "JSON Schema 2020-12 of the inputs"},
        "output_schema": {**OPEN_OBJECT, "description": "JSON Schema 2020-12 of the outputs"},
        "predictors": {"type": "array", "items": {"type": "string"},
                       "description": "the predictors a stored program state has an entry for"}},
    "required": ["name", "input_schema", "output_schema"],
    "additionalProperties": True,
}


def _event(kind: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    common = {"type": {"type": "string", "const": kind},
              "id": {**_NULLABLE_STR, "description": "the stream entry id (also the SSE id); null for a state "
                                                     "event and for a final event built from the stored result"},
              "ts": {"type": "number", "description": "unix seconds"}}
    return {"type": "object", "description": description,  # no title: generators would name the class by it
            "properties": {**common, **properties}, "required": ["type", *required], "additionalProperties": True}


_EVENTS: dict[str, dict[str, Any]] = {
    "JobStatusEvent": _event("status", "The job (re)started on a worker, or waits to run again", {
        "state": {"type": "string", "enum": list(LIVE_STATES)}, "attempt": {"type": "integer"},
        "worker": {"type": "string"}, "reason": {"type": "string"}}, ["state"]),
    "JobStepEvent": _event("step", "A module or predictor of the program started or ended", {
        "phase": {"type": "string", "enum": ["start", "end"]}, "name": {"type": "string"},
        "kind": {"type": "string", "enum": ["module", "predictor"]},
        "error": {"type": "string", "description": "what the step raised"}}, ["phase", "name"]),
    "JobToolEvent": _event("tool", "A tool call: start with its arguments, end with its result or error", {
        "phase": {"type": "string", "enum": ["start", "end"]}, "name": {"type": "string"},
        "arguments": OPEN_OBJECT, "result": {**_ANY_JSON, "description": "what the tool returned"},
        "error": {"type": "string", "description": "what the tool raised"}}, ["phase", "name"]),
    "JobTokenEvent": _event("token", "A chunk of an output field as the LM streams it: the chunks of a field "
                                     "since its last reset, joined, equal that field of the result", {
        "field": {"type": "string"}, "chunk": {"type": "string"},
        "predictor": {**_NULLABLE_STR, "description": "the predictor that streamed the chunk; null for a chunk "
                                                      "that was not streamed (a cache hit, or the rest of the "
                                                      "final value)"},
        "reset": {"type": "boolean", "description": "the field starts over (a retried or repeated LM call)"}},
        ["field", "chunk"]),
    "JobResultEvent": _event("result", "The last event of a job that succeeded: its result, as GET "
                                       "/v1/jobs/{job_id} shows it", {"result": ref("Result")}, ["result"]),
    "JobErrorEvent": _event("error", "The last event of a job that failed", {"error": {
        "type": "object", "properties": {"type": {"type": "string"}, "code": _NULLABLE_STR,
                                         "message": {"type": "string"},
                                         "errors": {"type": "array", "items": ref("FieldError")}},
        "required": ["type", "message"]}}, ["error"]),
    "JobStateEvent": _event("state", "A change of the Celery state of a job that wrote no live event yet", {
        "state": ref("JobState")}, ["state"]),
}
#: The SSE event names of a job's stream: its events' types.
JOB_EVENT_TYPES = tuple(str(event["properties"]["type"]["const"]) for event in _EVENTS.values())
JOB_EVENT: dict[str, Any] = {
    "description": "One live event of a job; the SSE event name is its type",
    "oneOf": [ref(name) for name in _EVENTS],
    "discriminator": {"propertyName": "type", "mapping": {
        event["properties"]["type"]["const"]: f"#/components/schemas/{name}" for name, event in _EVENTS.items()}},
}


def sse_item_schema(data: dict[str, Any], events: list[str] | None = None) -> dict[str, Any]:
    """One Server-Sent Event, whose ``data`` is JSON: the ``itemSchema`` of a ``text/event-stream`` response
    (OpenAPI 3.2's convention, which validators such as Schemathesis read in a 3.1 document too).

    There is no ``schema`` beside it: that would describe the whole stream, which generated clients would
    then try to parse as one JSON value.
    """
    event: dict[str, Any] = {"type": "string", "enum": events} if events else {"type": "string"}
    return {"type": "object", "properties": {
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
        "event": event, "id": {"type": "string"}, "retry": {"type": "integer"}}, "required": ["data"]}


def how_to_follow(path: str, event: str) -> str:
    """How to follow a Server-Sent Events route (``path``, with ``{...}`` parameters), whose events' ``data``
    is the component ``event``: said in its operation's description."""
    return (
        "**Following the stream.** Any Server-Sent Events client will do, as long as it sends the API key in a "
        f"header. From a shell: `curl -N -H \"Authorization: Bearer $KEY\" \"$GATEWAY{path}\"` (`-N` prints each "
        "event as it comes); add `-H \"Last-Event-ID: <id>\"` to resume after the event with that id. In Node, "
        "the `eventsource` package's EventSource sends headers through its `fetch` option: `new EventSource(url, "
        "{fetch: (u, init) => fetch(u, {...init, headers: {...init.headers, Authorization: `Bearer ${key}`}})})`, "
        "then `source.addEventListener(type, (e) => JSON.parse(e.data))`, and it resumes with Last-Event-ID by "
        "itself. A browser's own EventSource cannot send a header: read the response with `fetch()` and a "
        "TextDecoder, or through a proxy that adds the key. Frames are `id:`, `event:` and `data:` lines ended "
        "by a blank line; lines starting with `:` are comments (keepalives). Each frame's `data` is one JSON "
        f"object, the component schema `{event}`; generated clients have that type but do not parse the stream "
        "(the response has an `itemSchema`, one event, and no `schema`)."
    )


#: The component schemas of the bodies above, by name.
RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "FieldError": FIELD_ERROR,
    "JobState": {"type": "string", "enum": list(JOB_STATES), "description": "a job's Celery state"},
    "RunStatus": {"type": "string", "enum": [s.value for s in RunStatus]},
    "RunStage": {"type": "string", "enum": [s.value for s in Stage],
                 "description": "the stage a run is at; done, failed and cancelled end it"},
    "Usage": USAGE,
    "JobError": JOB_ERROR,
    "TraceEntry": TRACE_ENTRY,
    "Result": result_schema(OPEN_OBJECT),
    "Job": job_schema(ref("Result"), _NULLABLE_STR),
    "JobSummary": JOB_SUMMARY,
    "JobList": JOB_LIST,
    "Run": RUN,
    "RunSummary": RUN_SUMMARY,
    "RunEvent": RUN_EVENT,
    "SignatureDescription": SIGNATURE_DESCRIPTION,
    **_EVENTS,
    "JobEvent": JOB_EVENT,
}
