"""Signatures for the LM-control system tests (imported by the worker processes and the test process).

Every one has ``qa``'s fields, so the HTTP mock LM answers them with type-correct values; each points
at its own model name, which ``DSPEX_LM_ENDPOINTS`` routes to its own mock server.
"""

from __future__ import annotations

from dspex_tasks.dsl.signature import signature

SPEC = "question: str -> answer: str, confidence: confidence_score"

lc_limited = signature(SPEC, name="lc_limited", lm="openai/limited")
lc_cached = signature(SPEC, name="lc_cached", cache=True)
lc_fallback = signature(SPEC, name="lc_fallback", lm=["openai/down", "openai/mock"])
lc_flaky = signature(SPEC, name="lc_flaky", lm="openai/flaky")
lc_slow = signature(SPEC, name="lc_slow", lm="openai/slow")
lc_ctx = signature(SPEC, name="lc_ctx", lm="openai/ctx")
lc_plain = signature(SPEC, name="lc_plain")
