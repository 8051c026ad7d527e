"""Request and response bodies of the gateway's fixed routes (the per-signature ones come from the schemas)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from .checks import integral

__all__ = [
    "ID_PATTERN", "RUN_ID_PATTERN", "IdPath", "JobIdPath", "RunIdPath", "ProgramPut", "ProgramVersion", "ProgramOut", "Names",
    "Versions", "Rollback", "OptimizationRequest", "RunList", "Health",
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


class Versions(BaseModel):
    session: str
    program: str
    versions: list[int]


class Rollback(_Strict):
    version: Annotated[int, BeforeValidator(integral)] = Field(ge=1)


class OptimizationRequest(_Strict):
    """Start an optimization run (rows are validated against the signature before anything runs)."""

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
