"""Flower configuration for dspex-tasks (the file ``--conf`` names). The real one ships in the package,
``dspex_tasks/observability/flower_config.py``, which ``dspex flower`` uses by default; this file keeps
``celery -A workers.app flower --conf=flower_config.py`` working from a checkout.

Flower executes this file and takes every top-level name that matches one of its options: it runs the
packaged file afresh each time (so the environment and command line of this run apply) and takes its options.
"""

import runpy as _runpy
from pathlib import Path as _Path

import dspex_tasks as _dspex_tasks

globals().update({_k: _v for _k, _v in _runpy.run_path(
    str(_Path(_dspex_tasks.__file__).parent / "observability" / "flower_config.py")).items() if not _k.startswith("_")})
