"""The OpenAI ChatCompletion-shaped response our LMs return (the mock LM, and the governed LM's cache hits).

DSPy reads a legacy ``BaseLM.forward()`` result by attribute (``response.choices[0].message.content``);
a plain dict of JSON keeps it serializable for the shared cache. :class:`Response` is both.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Response", "as_response"]


class Response(dict[str, Any]):
    """An OpenAI ChatCompletion-shaped dict whose keys also read as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _wrap(obj: Any) -> Any:
    if isinstance(obj, dict):
        return Response({k: _wrap(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return [_wrap(v) for v in obj]
    return obj


def as_response(payload: dict[str, Any]) -> Response:
    """``payload`` (and every dict inside it) as a :class:`Response`."""
    return Response({k: _wrap(v) for k, v in payload.items()})
