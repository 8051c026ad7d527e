"""Test helpers for values: DSPy predictions hold pydantic models where results hold JSON."""

from __future__ import annotations

from typing import Any

import pydantic


def plain(value: Any) -> Any:
    """``value`` with every pydantic model dumped, recursively (what a result's JSON would hold)."""
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump()
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
