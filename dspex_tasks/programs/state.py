"""Build DSPy modules from signatures and load stored JSON state into them safely.

Only demos and the signature's instructions/field texts are taken from stored
state; ``lm`` (endpoints, keys, custom classes) and any other key is ignored,
so a stored program can never redirect calls or set arbitrary attributes.
State naming a predictor the module does not have is refused, never ignored
(see :func:`dspex_tasks.programs.store.predictor_states`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ValidationError
from .bridge import build_module
from .store import predictor_states

if TYPE_CHECKING:  # pragma: no cover
    from ..dsl.signature import Signature


def load_program(sig: Signature, state: dict[str, Any] | None) -> Any:
    """A fresh module for ``sig`` with ``state`` (DSPy ``dump_state()`` JSON or ``{demos, instructions}``).

    Raises:
        ValidationError: when the state does not fit the module: it names a predictor the module does not
            have (the field is that key), or demos are not a list of objects.
    """
    module = build_module(sig)
    if not state:
        return module
    predictors = dict(module.named_predictors())
    what = f"program '{sig.name}'" if sig.kind == "program" else f"the {sig.module} module of signature '{sig.name}'"
    parts = predictor_states(state, list(predictors), module=what)
    for name, (key, pstate) in parts.items():
        predictor = predictors[name]
        demos = pstate.get("demos", [])
        if not isinstance(demos, list) or not all(isinstance(d, dict) for d in demos):
            where = f"{key}.demos" if key else "demos"
            raise ValidationError.from_errors("program state", [{"field": where, "message": "expected a list of objects"}])
        safe: dict[str, Any] = {"demos": demos, "traces": [], "train": [], "lm": None,
                                "signature": predictor.signature.dump_state()}
        sig_state = pstate.get("signature")
        if isinstance(sig_state, dict) and isinstance(sig_state.get("instructions"), str):
            safe["signature"]["instructions"] = sig_state["instructions"]
        if isinstance(pstate.get("instructions"), str):
            safe["signature"]["instructions"] = pstate["instructions"]
        predictor.load_state(safe)
    return module


def dump_program(module: Any) -> dict[str, Any]:
    """JSON state of a module (what optimizers produce), without LM settings."""
    state: dict[str, Any] = module.dump_state()

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != "lm"}
        return obj

    return strip(state)  # type: ignore[no-any-return]
