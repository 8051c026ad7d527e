"""Signatures and their typed jobs: the registry, one signature, submit, submit-and-wait, a typed job.

Per-signature operations are parameterized routes (``/v1/signatures/{name}/jobs``) kept out of FastAPI's
schema: the OpenAPI document describes each published signature's own operations instead
(:mod:`..openapi`). Submits validate against the published schema and send from the gateway's sender
pool; waits are async on Redis. Submitting needs the ``write`` right on the body's session (``@default`` when it
names none); the job is recorded as the key's (:mod:`.access`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from ...errors import JobNotFound, ValidationError
from ..checks import envelope, read_json
from ..openapi import ref
from ..problems import Problem, problem_for_error, problem_response
from ..scopes import Access
from ..state import Gateway
from .access import ReadableJob, ReadKey, WriteKey, check_session
from .common import GatewayDep

__all__ = ["router"]


class _SignatureName(Convertor[str]):
    """Signature names (``signature()``'s rule): ``/v1/signatures/qa:run`` is never the signature 'qa:run'."""

    regex = "[A-Za-z][A-Za-z0-9_.-]{0,63}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


# before any route below is created: a route compiles its path (and looks up the convertor) when made
register_url_convertor("dspex_signature", _SignatureName())

router = APIRouter()


class _InputsProblem(Exception):
    def __init__(self, exc: ValidationError) -> None:
        super().__init__(str(exc))
        self.exc = exc


async def _submit(gw: Gateway, name: str, request: Request, access: Access) -> tuple[str, str]:
    await gw.signature(name)
    inputs, session, program, options = envelope(await read_json(request))
    check_session(access, session)
    if program is not None and session is not None:
        await run_in_threadpool(gw.check_program, name, session, program)
    try:
        # every option is a keyword of submit (trace, lm_config, stream, timeout_s): none is dropped on the way
        job = await gw.enqueue(gw.client.submit, name, inputs, session=session, program=program, **options)
    except ValidationError as exc:
        raise _InputsProblem(exc) from None
    await gw.jobs.record(job.id, name, access.key_id, session)
    return job.id, f"/v1/signatures/{name}/jobs/{job.id}"


@router.get("/v1/signatures", tags=["signatures"], summary="The published signatures (the registry)",
            responses={200: {"description": "name -> description", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"signatures": {
                    "type": "object", "additionalProperties": ref("SignatureDescription")}},
                "required": ["signatures"]}}}}})
async def list_signatures(gw: GatewayDep, _access: ReadKey) -> JSONResponse:
    await gw.reload()
    return JSONResponse({"signatures": gw.signatures})


@router.get("/v1/signatures/{name:dspex_signature}", include_in_schema=False)
async def describe(name: str, gw: GatewayDep, _access: ReadKey) -> JSONResponse:
    return JSONResponse(await gw.signature(name))


@router.post("/v1/signatures/{name:dspex_signature}/jobs", include_in_schema=False)
async def submit_job(name: str, request: Request, gw: GatewayDep, access: WriteKey) -> Response:
    try:
        job_id, location = await _submit(gw, name, request, access)
    except _InputsProblem as p:
        return problem_for_error(p.exc, instance=request.url.path, pointer_prefix="inputs")
    return JSONResponse({"id": job_id, "signature": name, "state": "PENDING"}, status_code=202,
                        headers={"Location": location})


@router.post("/v1/signatures/{name:dspex_signature}:run", include_in_schema=False)
async def run_job(name: str, request: Request, gw: GatewayDep, access: WriteKey,
                  timeout: Annotated[float, Query(ge=0, le=300)] = 30.0) -> Response:
    try:
        job_id, location = await _submit(gw, name, request, access)
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


@router.get("/v1/signatures/{name:dspex_signature}/jobs/{job_id}", include_in_schema=False)
async def get_typed_job(name: str, job: ReadableJob, gw: GatewayDep) -> JSONResponse:
    view = gw.job_view(job.id, job.record, job.meta)
    if view["signature"] != name:
        raise Problem(404, JobNotFound.code, f"no {name} job '{job.id}'")
    return JSONResponse(view)
