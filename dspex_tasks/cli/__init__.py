"""The ``dspex`` command line: one module per command group (``dspex = "dspex_tasks.cli:main"``)."""

from __future__ import annotations

from .core import app, main

__all__ = ["app", "main"]
