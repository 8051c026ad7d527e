"""The gateway's routes: signatures and their jobs, jobs, sessions and programs, optimization runs.

Per-signature operations are parameterized routes (``/v1/signatures/{name}/jobs``) kept out of FastAPI's
schema: the OpenAPI document describes each published signature's own operations instead
(:mod:`.openapi`). Store calls are synchronous and run in the thread pool; job waits and event streams
are async on Redis.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from ..errors import ProgramNotFound, ValidationError
from .app import Gateway
from .checks import check_program_state, envelope, read_json
from .models import (
    Health,
    IdPath,
    JobIdPath,
    Names,
    OptimizationRequest,
    ProgramOut,
    ProgramPut,
    ProgramVersion,
    Rollback,
    RunIdPath,
    RunList,
    Versions,
)
from .openapi import RUN_EVENT_SCHEMA, ref, sse_schema
from .problems import Problem, problem_for_error, problem_response
from .sse import event_stream, job_events, run_events

__all__ = ["register"]


class _SignatureName(Convertor[str]):
    """Signature names (``signature()``'s rule): ``/v1/signatures/qa:run`` is never the signature 'qa:run'."""

    regex = "[A-Za-z][A-Za-z0-9_.-]{0,63}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("dspex_signature", _SignatureName())

_RUN_SSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "One event per progress step (data: a run event); the last has stage done, failed or cancelled. "
                   "Reconnect with Last-Event-ID to resume.",
    "content": {"text/event-stream": {"schema": sse_schema(RUN_EVENT_SCHEMA)}}}}
_JOB_SSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "'state' events ({id, state}) on each change, then one 'done' event with the job",
    "content": {"text/event-stream": {"schema": sse_schema({"type": "object"}, ["state", "done"])}}}}


def _json_doc(name: str, description: str = "OK") -> dict[int | str, dict[str, Any]]:
    return {200: {"description": description, "content": {"application/json": {"schema": ref(name)}}}}


def register(app: FastAPI, gw: Gateway) -> None:  # noqa: C901 - one closure per route
    async def submit(name: str, request: Request) -> tuple[str, str]:
        await gw.signature(name)
        inputs, session, program = envelope(await read_json(request))
        if program is not None and session is not None:
            await run_in_threadpool(gw.check_program, name, session, program)
        try:
            job = await gw.enqueue(gw.client.submit, name, inputs, session=session, program=program)
        except ValidationError as exc:
            raise _InputsProblem(exc) from None
        await gw.jobs.record(job.id, name, getattr(request.state, "api_key_id", ""))
        return job.id, f"/v1/signatures/{name}/jobs/{job.id}"

    # -- meta and signatures -----------------------------------------------------------------
    @app.get("/healthz", response_model=Health, tags=["meta"], summary="Liveness and the signature count")
    async def healthz() -> Health:
        return Health(status="ok", signatures=len(gw.signatures))

    @app.get("/v1/signatures", tags=["signatures"], summary="The published signatures (the registry)",
             responses={200: {"description": "name -> description", "content": {"application/json": {"schema": {
                 "type": "object", "properties": {"signatures": {
                     "type": "object", "additionalProperties": ref("SignatureDescription")}},
                 "required": ["signatures"]}}}}})
    async def list_signatures() -> JSONResponse:
        await gw.reload()
        return JSONResponse({"signatures": gw.signatures})

    @app.get("/v1/signatures/{name:dspex_signature}", include_in_schema=False)
    async def describe(name: str) -> JSONResponse:
        return JSONResponse(await gw.signature(name))

    @app.post("/v1/signatures/{name:dspex_signature}/jobs", include_in_schema=False)
    async def submit_job(name: str, request: Request) -> Response:
        try:
            job_id, location = await submit(name, request)
        except _InputsProblem as p:
            return problem_for_error(p.exc, instance=request.url.path, pointer_prefix="inputs")
        return JSONResponse({"id": job_id, "signature": name, "state": "PENDING"}, status_code=202,
                            headers={"Location": location})

    @app.post("/v1/signatures/{name:dspex_signature}:run", include_in_schema=False)
    async def run_job(name: str, request: Request,
                      timeout: Annotated[float, Query(ge=0, le=300)] = 30.0) -> Response:
        try:
            job_id, location = await submit(name, request)
        except _InputsProblem as p:
            return problem_for_error(p.exc, instance=request.url.path, pointer_prefix="inputs")
        view = gw.job_view(job_id, {"signature": name}, await gw.jobs.wait(job_id, timeout))
        if view["state"] == "SUCCESS":
            return JSONResponse(view)
        if "error" in view:
            err = view["error"]
            return problem_response(gw.failure_status(view), err["code"], err["message"], instance=request.url.path,
                                    errors=err.get("errors"), job_id=job_id)
        return JSONResponse(view, status_code=202, headers={"Location": location})

    @app.get("/v1/signatures/{name:dspex_signature}/jobs/{job_id}", include_in_schema=False)
    async def get_typed_job(name: str, job_id: JobIdPath) -> JSONResponse:
        view = await _job(job_id)
        if view["signature"] != name:
            raise Problem(404, ProgramNotFound.code, f"no {name} job '{job_id}'")
        return JSONResponse(view)

    # -- jobs ----------------------------------------------------------------------------------
    async def _job(job_id: str) -> dict[str, Any]:
        record, meta = await gw.jobs.lookup(job_id)
        if record is None and meta is None:
            raise Problem(404, ProgramNotFound.code, f"no job '{job_id}' (unknown, or its result expired)")
        return gw.job_view(job_id, record, meta)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], summary="A job's state and, once done, its result",
             responses=_json_doc("Job"))
    async def get_job(job_id: JobIdPath) -> JSONResponse:
        return JSONResponse(await _job(job_id))

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], responses=_JOB_SSE, response_class=Response,
             summary="Server-Sent Events: 'state' on each change, then 'done' with the job")
    async def job_stream(job_id: JobIdPath) -> Response:
        record, _ = await gw.jobs.lookup(job_id)
        first = await _job(job_id)
        return event_stream(job_events(gw.jobs, job_id, lambda meta: gw.job_view(job_id, record or first, meta)))

    # -- sessions and programs -----------------------------------------------------------------
    @app.get("/v1/sessions", response_model=Names, tags=["programs"], summary="Sessions, most recent first")
    def list_sessions() -> Names:
        return Names(items=gw.client.programs.sessions())

    @app.delete("/v1/sessions/{session}", status_code=204, response_class=Response, tags=["programs"],
                summary="Delete a session and all its programs")
    def delete_session(session: IdPath) -> Response:
        gw.client.programs.delete_session(session)
        return Response(status_code=204)

    @app.get("/v1/sessions/{session}/programs", response_model=Names, tags=["programs"],
             summary="Program names stored in a session")
    def list_programs(session: IdPath) -> Names:
        return Names(items=gw.client.programs.list(session))

    @app.get("/v1/sessions/{session}/programs/{program}", response_model=ProgramOut, tags=["programs"],
             summary="The current (or a given) version of a program")
    def get_program(session: IdPath, program: IdPath,
                    version: Annotated[int | None, Query(ge=1)] = None) -> ProgramOut:
        rec = gw.client.programs.get(session, program, version)
        return ProgramOut(session=session, program=program, version=rec.version, signature=rec.signature,
                          updated_at=rec.updated_at, state=rec.state)

    @app.put("/v1/sessions/{session}/programs/{program}", response_model=ProgramVersion, tags=["programs"],
             summary="Store a new version of a program and make it current")
    def put_program(session: IdPath, program: IdPath, body: ProgramPut) -> ProgramVersion:
        if body.signature is not None and body.signature not in gw.signatures:
            known = ", ".join(sorted(gw.signatures)) or "none"
            raise Problem(422, ValidationError.code, f"unknown signature '{body.signature}'", errors=[
                {"field": "signature", "message": f"not a published signature (published: {known})",
                 "pointer": "/signature"}])
        check_program_state(body.state)
        version = gw.client.programs.put(session, program, body.state, signature=body.signature)
        return ProgramVersion(session=session, program=program, version=version)

    @app.delete("/v1/sessions/{session}/programs/{program}", status_code=204, response_class=Response,
                tags=["programs"], summary="Delete a program and its history")
    def delete_program(session: IdPath, program: IdPath) -> Response:
        gw.client.programs.delete(session, program)
        return Response(status_code=204)

    @app.get("/v1/sessions/{session}/programs/{program}/history", response_model=Versions, tags=["programs"],
             summary="Stored versions of a program")
    def program_history(session: IdPath, program: IdPath) -> Versions:
        versions = gw.client.programs.history(session, program)
        if not versions:
            raise ProgramNotFound(f"no program '{program}' in session '{session}'")
        return Versions(session=session, program=program, versions=versions)

    @app.post("/v1/sessions/{session}/programs/{program}/rollback", response_model=ProgramVersion,
              tags=["programs"], summary="Make an earlier version current again")
    def rollback_program(session: IdPath, program: IdPath, body: Rollback) -> ProgramVersion:
        version = gw.client.programs.rollback(session, program, body.version)
        return ProgramVersion(session=session, program=program, version=version)

    # -- optimization runs ------------------------------------------------------------------------
    @app.post("/v1/optimizations", status_code=202, tags=["optimizations"], response_class=JSONResponse,
              summary="Start an optimization run",
              responses={202: {"description": "Started", "content": {"application/json": {"schema": ref("Run")}},
                               "headers": {"Location": {"schema": {"type": "string"}}}}})
    def start_optimization(body: OptimizationRequest) -> JSONResponse:
        if body.dataset is not None and body.trainset is None and body.dataset not in gw.client.datasets.list():
            raise Problem(404, ProgramNotFound.code, f"no dataset '{body.dataset}'",
                          errors=[{"field": "dataset", "message": "no such dataset", "pointer": "/dataset"}])
        run = gw.client.optimize(body.signature, body.trainset, body.valset, metric=body.metric,
                                 optimizer=body.optimizer, session=body.session, program=body.program,
                                 params=body.params, dataset=body.dataset)
        return JSONResponse(run.status(), status_code=202, headers={"Location": f"/v1/optimizations/{run.id}"})

    @app.get("/v1/optimizations", response_model=RunList, tags=["optimizations"],
             summary="Recent run ids (of one session, if given)")
    def list_optimizations(session: Annotated[str | None, Query(min_length=1, max_length=128,
                                                                pattern=r"^[A-Za-z0-9._:-]+$")] = None,
                           limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> RunList:
        return RunList(items=gw.client.runs.ids(session, limit))

    @app.get("/v1/optimizations/{run_id}", tags=["optimizations"], response_class=JSONResponse,
             summary="A run's record: status, stage, scores, and the summary once done", responses=_json_doc("Run"))
    def get_optimization(run_id: RunIdPath) -> JSONResponse:
        return JSONResponse(gw.client.runs.get(run_id))

    @app.post("/v1/optimizations/{run_id}/cancel", status_code=202, tags=["optimizations"],
              response_class=JSONResponse, summary="Stop a run at its next stage boundary",
              responses={202: {"description": "Cancel requested",
                               "content": {"application/json": {"schema": ref("Run")}}}})
    def cancel_optimization(run_id: RunIdPath) -> JSONResponse:
        run = gw.client.run(run_id)
        run.cancel()
        return JSONResponse(run.status(), status_code=202)

    @app.get("/v1/optimizations/{run_id}/events", tags=["optimizations"], responses=_RUN_SSE, response_class=Response,
             summary="Server-Sent Events: every progress event from the start, then live, until the run ends")
    async def optimization_events(run_id: RunIdPath, request: Request) -> Response:
        await run_in_threadpool(gw.client.runs.get, run_id)  # 404 before the stream starts
        after = request.headers.get("last-event-id")
        return event_stream(run_events(gw.aredis, gw.settings.namespace, run_id, after))


class _InputsProblem(Exception):
    def __init__(self, exc: ValidationError) -> None:
        super().__init__(str(exc))
        self.exc = exc
