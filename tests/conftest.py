"""Shared fixtures for the three test layers.

Layer 2 and 3 tests get a private redis-server on a free port (never DB 0 of a
shared server). ``DSPEX_TEST_REDIS_URL`` may point at another server; then a
dedicated DB (default 13) is flushed before each test. The fixtures are the library's
own pytest plugin (``dspex_tasks.testing.plugin``), the one users' tests get too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Import hypothesis (and the module its pytest plugin imports at the end of a run) up front:
# imported that late, after worker threads ran, CPython 3.11.7's ast.parse inside pytest's
# assertion rewriter can fail with "AST constructor recursion depth mismatch".
import hypothesis  # noqa: F401
import hypothesis.internal.observability  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The fixtures are the package's own pytest plugin (entry point ``dspex``: dspex_tasks/testing/plugin.py), which
# loads by itself once the package is installed, as in a user's project; pytester tests the plugin from one.
pytest_plugins = ["pytester"]

# Tests must never pick up a developer's real LM key or settings.
for _var in [v for v in os.environ if v.startswith("DSPEX_") and not v.startswith("DSPEX_TEST_")]:
    del os.environ[_var]
