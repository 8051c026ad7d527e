from __future__ import annotations

import pytest

from dspex_tasks.programs.store import MemoryProgramStore
from tests._store_contract import StoreContract

pytestmark = pytest.mark.unit


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def store(self) -> MemoryProgramStore:
        return MemoryProgramStore(max_state_bytes=10_000)
