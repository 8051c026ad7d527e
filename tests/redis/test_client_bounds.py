"""Layer 2: run ids and dataset rows through the client on a real Redis: typed errors, nothing written."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from dspex_tasks import errors, keys

pytestmark = pytest.mark.redis


@pytest.fixture
def bare_client(settings: Any) -> Iterator[Any]:
    """A client with no worker: these paths only read and write Redis."""
    from dspex_tasks.client import Client

    c = Client(settings=settings)
    yield c
    c.close()


def test_a_run_id_that_is_not_32_hex_is_invalid_on_every_client_path(bare_client: Any, redis_client: Any) -> None:
    store = bare_client.runs
    run_id = store.create({"signature": "qa", "program": "qa", "optimizer": "bootstrap_few_shot",
                           "metric": "exact_match"})
    assert len(run_id) == 32 and bare_client.run(run_id).id == run_id
    store.save_checkpoint(run_id, "data", {"x": 1})
    for bad in (f"{run_id}:ckpt:data", "nope", run_id.upper()):
        for call in (bare_client.run, store.get, store.candidate, store.delete, lambda r: list(store.events(r))):
            with pytest.raises(errors.InvalidId, match="invalid run id"):
                call(bad)
        with pytest.raises(errors.InvalidId):
            store.create({"run_id": bad, "signature": "qa", "program": "qa", "optimizer": "o", "metric": "m"})
    with pytest.raises(errors.RunNotFound):
        bare_client.run(uuid.uuid4().hex)
    assert redis_client.type(keys.run_checkpoint(bare_client.settings.namespace, run_id, "data")) == b"string"


def test_dataset_rows_with_nan_or_deep_nesting_are_named_and_not_stored(bare_client: Any) -> None:
    rows: list[dict[str, Any]] = [{"question": "q", "answer": "a"}, {"question": "q", "answer": math.nan}]
    with pytest.raises(errors.ValidationError) as info:
        bare_client.datasets.put("d1", rows)
    assert info.value.errors[0]["field"] == "d1.1.answer"
    deep: Any = "x"
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(errors.ValidationError, match="deeper than 64 levels"):
        bare_client.datasets.put("d1", [{"question": deep}])
    with pytest.raises(errors.ValidationError, match="deeper than 64 levels"):
        bare_client.programs.put("s1", "qa", {"demos": [], "instructions": deep})
    assert bare_client.datasets.list() == []
