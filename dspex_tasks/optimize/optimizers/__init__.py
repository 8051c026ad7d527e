"""Optimizers by name. Adding one (GEPA, COPRO, ...) is one module that calls :func:`register`.

An optimizer turns (student module, trainset, valset, metric, params) into a
compiled module. Its params are a pydantic model, so bad params fail before
anything runs, naming the field. A key neither the model nor :class:`CommonParams`
knows is refused (with a did-you-mean) unless the model sets ``extra="allow"``.
Workers publish :func:`params_schemas` so clients check params before enqueueing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydantic

from ...errors import ValidationError
from ..params import unknown_param_message

__all__ = ["Optimizer", "register", "get_optimizer", "optimizer_names", "params_schemas", "CommonParams"]


class CommonParams(pydantic.BaseModel):
    """Params every run accepts, whatever the optimizer.

    ``extra="allow"``: a run's params mix these with the optimizer's own, which
    :meth:`Optimizer.parse_params` checks (unknown keys included).
    """

    model_config = pydantic.ConfigDict(extra="allow")
    min_gain: float = pydantic.Field(1e-9, description="promote only if candidate - baseline >= this")
    val_fraction: float = pydantic.Field(0.3, gt=0, lt=1, description="held out from the trainset without a valset")
    eval_chunk_size: int = pydantic.Field(16, ge=1, le=1000)
    seed: int = 0
    num_threads: int = pydantic.Field(8, ge=1, le=64)


@dataclass(frozen=True)
class Optimizer:
    """A registered optimizer.

    ``compile(student, trainset, valset, metric, params, progress)`` returns the compiled module and a
    list of trial scores (may be empty). ``estimate(n_train, n_val, params)`` guesses LM calls for progress.
    """

    name: str
    params: type[pydantic.BaseModel]
    compile: Callable[..., tuple[Any, list[float]]]
    estimate: Callable[[int, int, Any], int]
    description: str = ""

    def _names(self) -> set[str]:
        names = set()
        for name, f in self.params.model_fields.items():
            names.add(name)
            names.update(a for a in (f.alias, f.validation_alias) if isinstance(a, str))
        return names

    def parse_params(self, raw: dict[str, Any] | None) -> Any:
        """The optimizer's own params from a run's params (common keys skipped, unknown keys refused)."""
        common = set(CommonParams.model_fields)
        own = {k: v for k, v in (raw or {}).items() if k not in common}
        errors: list[dict[str, str]] = []
        if self.params.model_config.get("extra") != "allow":
            names = self._names()
            errors = [{"field": f"params.{k}", "message": unknown_param_message(k, names | common, self.name)}
                      for k in own if k not in names]
            own = {k: v for k, v in own.items() if k in names}
        try:
            parsed = self.params.model_validate(own)
        except pydantic.ValidationError as exc:
            errors += [{"field": "params." + ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                       for e in exc.errors(include_url=False)]
        if errors:
            raise ValidationError.from_errors(f"params for optimizer '{self.name}'", errors)
        return parsed

    def params_schema(self) -> dict[str, Any]:
        """JSON Schema of everything a run of this optimizer accepts in ``params`` (own and common keys)."""
        own = self.params.model_json_schema()
        common = CommonParams.model_json_schema()
        props = {**(own.get("properties") or {}), **(common.get("properties") or {})}
        schema: dict[str, Any] = {"type": "object", "title": f"{self.name} params", "properties": props,
                                  "additionalProperties": self.params.model_config.get("extra") == "allow"}
        required = [r for r in own.get("required") or [] if r not in CommonParams.model_fields]
        if required:
            schema["required"] = required
        defs = {**(own.get("$defs") or {}), **(common.get("$defs") or {})}
        if defs:
            schema["$defs"] = defs
        return schema


_REGISTRY: dict[str, Optimizer] = {}
_BUILTIN = ("bootstrap", "random_search", "miprov2")


def register(opt: Optimizer) -> Optimizer:
    _REGISTRY[opt.name] = opt
    return opt


def _load_builtins() -> None:
    for mod in _BUILTIN:
        importlib.import_module(f"{__name__}.{mod}")


def get_optimizer(name: str) -> Optimizer:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValidationError.from_errors("optimization", [{
            "field": "optimizer", "message": f"unknown optimizer '{name}'; known: {', '.join(optimizer_names())}"}]
        ) from None


def optimizer_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def params_schemas() -> dict[str, dict[str, Any]]:
    """Each registered optimizer's :meth:`Optimizer.params_schema`, by name (what workers publish)."""
    _load_builtins()
    return {name: _REGISTRY[name].params_schema() for name in sorted(_REGISTRY)}


def as_fractions(scores: list[float]) -> list[float]:
    """DSPy's own evaluations report percentages; ours report fractions. One scale for trials."""
    return [s / 100.0 for s in scores] if any(s > 1.0 for s in scores) else scores


def parse_common(raw: dict[str, Any] | None) -> CommonParams:
    try:
        return CommonParams.model_validate(raw or {})
    except pydantic.ValidationError as exc:
        errors = [{"field": "params." + ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                  for e in exc.errors(include_url=False)]
        raise ValidationError.from_errors("optimization params", errors) from None
