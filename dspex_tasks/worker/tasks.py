"""Programs as typed Celery tasks: ``dspex.<name>`` per registered signature, and ``dspex.map``.

A task is a thin wrapper: check the wire arguments, run :meth:`Runtime.predict`, and decide what a
failure means from its class (:mod:`dspex_tasks.lm.errors`): a full rate-limit bucket re-queues the task
on a budget of its own; a retryable LM error retries it with a backoff (or the provider's
``Retry-After``); anything else fails it, expected client errors without a traceback.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .. import wire
from ..errors import Cancelled, InvalidId, LMError, RateLimited, UnknownSignature, ValidationError
from ..lm.ratelimit import claim_from, lm_retries, requeue
from ..observability.redact import redact_error
from .live import JobControl, control_for

if TYPE_CHECKING:  # pragma: no cover
    from ..app import DspexCelery
    from ..dsl.signature import Signature

__all__ = ["EXPECTED_ERRORS", "register_signature", "register_map_task", "retry_countdown"]

#: Expected failures: recorded as FAILURE and logged without a traceback.
EXPECTED_ERRORS = (ValidationError, UnknownSignature, InvalidId, Cancelled)
#: The longest a task waits before its next LM attempt (a provider's Retry-After included): past the
#: countdown a worker holds the message, and it must come back well within the visibility timeout.
MAX_RETRY_COUNTDOWN_S = 300.0
_PREDICT_ARGS = "inputs, session, program, options"


def retry_countdown(exc: LMError, retries: int) -> float:
    """Seconds before retry ``retries + 1`` of a retryable LM error: exponential (1, 2, 4 ... 30 s), or the
    provider's ``Retry-After`` when that is longer (at most :data:`MAX_RETRY_COUNTDOWN_S`)."""
    backoff = float(min(2 ** retries, 30))
    return min(max(backoff, exc.retry_after or 0.0), MAX_RETRY_COUNTDOWN_S)


def _check_size(task: Any, value: Any, field: str) -> None:
    limit = task.app.dspex_settings.max_payload_bytes
    size = len(json.dumps(value, separators=(",", ":"), default=str))
    if size > limit:
        # result_extended stores the request's arguments with the failure: not those of a refused payload.
        task.request.args, task.request.kwargs = [], {}
        raise ValidationError.from_errors(
            "payload", [{"field": field, "message": f"{size} bytes exceeds the {limit}-byte payload limit"}])


def _ended(control: JobControl | None, exc: BaseException, state: str | None = None) -> None:
    """A streamed job's last event (``error``), or its ``status`` when it runs again (``retrying``, ``requeued``)."""
    if control is None:
        return
    if state is not None:
        control.emit("status", state=state, reason=str(exc)[:500])
    else:
        control.emit("error", error={"type": type(exc).__name__, "message": str(exc)[:2000],
                                     "code": getattr(exc, "code", None)})
    control.flush()


def register_signature(app: DspexCelery, sig: Signature) -> Any:
    """Register ``dspex.<name>`` for ``sig`` on ``app`` and return the task."""
    name = wire.task_name(sig.name)

    def run(self: Any, *args: Any, inputs: Any = None, session: str | None = None, program: str | None = None,
            options: Any = None, **extra: Any) -> wire.PredictResult:
        wire.check_task_args(name, args, extra, _PREDICT_ARGS)
        _check_size(self, inputs, "inputs")
        checked = wire.check_options(options)  # again: a bare send_task is checked by nobody else
        settings = self.app.dspex_settings
        claim_from(self.request, max_queue_s=settings.rate_limit_max_queue_s)  # its LM calls' rate-limit slots
        control = None
        try:
            control = control_for(self, dict(checked))
            control.check_start()  # cancelled while queued, or out of time: Cancelled (its error event too)
            control.emit("status", state="running", attempt=self.request.retries or 0,
                         worker=self.app.runtime.worker_id)
            result: wire.PredictResult = self.app.runtime.predict(sig, inputs, session, program, checked, control)
        except RateLimited as exc:  # re-queued with a countdown, on a budget of its own
            retry = requeue(self, exc, max_retries=settings.task_max_retries, max_queue_s=settings.rate_limit_max_queue_s,
                            max_countdown_s=settings.rate_limit_max_countdown_s,
                            visibility_timeout_s=settings.visibility_timeout_s)
            _ended(control, retry, "requeued")
            raise retry from None
        except LMError as exc:
            redact_error(exc)  # stored with the retry or the failure, and shown by Flower
            spent = lm_retries(self.request)
            if exc.retryable and spent < settings.task_max_retries:
                _ended(control, exc, "retrying")
                raise self.retry(exc=exc, countdown=retry_countdown(exc, spent)) from None
            _ended(control, exc)
            raise
        except Exception as exc:
            _ended(control, exc)
            raise
        result["task_id"] = self.request.id
        if control is not None:
            control.emit("result", result=result)
            control.flush()
        return result

    # max_retries=None: the budgets are ours (DSPEX_TASK_MAX_RETRIES; a full rate-limit bucket: by time,
    # DSPEX_RATE_LIMIT_MAX_QUEUE_S).
    return app.task(name=name, bind=True, shared=False, typing=False, acks_late=True, throws=EXPECTED_ERRORS,
                    reject_on_worker_lost=True, queue=app.dspex_settings.predict_queue, max_retries=None)(run)


def register_map_task(app: DspexCelery) -> Any:
    """``dspex.map``: many inputs of one signature in one message (``Client.map``)."""

    def run_map(self: Any, *args: Any, signature: str = "", items: Any = None, session: str | None = None,
                program: str | None = None, options: Any = None, **extra: Any) -> wire.MapResult:
        wire.check_task_args(wire.MAP_TASK, args, extra, "signature, items, session, program, options")
        checked = wire.check_options(options)
        sig = self.app.dspex_signatures.find(signature)
        if sig is None:
            raise UnknownSignature(f"unknown signature '{signature}' on worker")
        if not isinstance(items, list):
            raise ValidationError.from_errors("map items", [{"field": "items", "message": "expected a list"}])
        _check_size(self, items, "items")
        return {"results": self.app.runtime.predict_many(sig, items, session, program, checked)}

    return app.task(name=wire.MAP_TASK, bind=True, shared=False, typing=False, acks_late=True,
                    reject_on_worker_lost=True, throws=EXPECTED_ERRORS, queue=app.dspex_settings.predict_queue)(run_map)
