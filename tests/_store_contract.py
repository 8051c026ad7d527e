"""The ProgramStore contract, run against both the Redis store and its in-memory twin."""

from __future__ import annotations

from typing import Any

import pytest

from dspex_tasks import errors


class StoreContract:
    """Subclasses provide a ``store`` fixture."""

    def test_put_get_versions(self, store: Any) -> None:
        assert store.current_version("s1", "qa") == 0
        v1 = store.put("s1", "qa", {"demos": [{"n": 1}]}, signature="qa")
        v2 = store.put("s1", "qa", {"demos": [{"n": 1}, {"n": 2}]}, signature="qa")
        assert (v1, v2) == (1, 2)
        rec = store.get("s1", "qa")
        assert rec.version == 2 and rec.state == {"demos": [{"n": 1}, {"n": 2}]} and rec.signature == "qa"
        assert store.get("s1", "qa", 1).state == {"demos": [{"n": 1}]}
        assert store.history("s1", "qa") == [1, 2]
        assert store.current_version("s1", "qa") == 2

    def test_rollback_keeps_history(self, store: Any) -> None:
        store.put("s1", "qa", {"n": 1})
        store.put("s1", "qa", {"n": 2})
        assert store.rollback("s1", "qa", 1) == 1
        assert store.get("s1", "qa").state == {"n": 1}
        assert store.history("s1", "qa") == [1, 2]
        assert store.put("s1", "qa", {"n": 3}) == 3
        with pytest.raises(errors.ProgramNotFound):
            store.rollback("s1", "qa", 9)

    def test_list_delete_sessions(self, store: Any) -> None:
        store.put("s1", "qa", {})
        store.put("s1", "cls", {})
        store.put("s2", "qa", {})
        assert store.list("s1") == ["cls", "qa"]
        assert set(store.sessions()) == {"s1", "s2"}
        store.delete("s1", "cls")
        assert store.list("s1") == ["qa"]
        with pytest.raises(errors.ProgramNotFound):
            store.get("s1", "cls")
        store.delete_session("s1")
        assert store.list("s1") == []
        assert store.sessions() == ["s2"]

    def test_idempotent_put_with_token(self, store: Any) -> None:
        v = store.put("s1", "qa", {"n": 1}, token="run-1")
        assert store.put("s1", "qa", {"n": 1}, token="run-1") == v
        assert store.history("s1", "qa") == [v]

    @pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "a/b", "sess{1}", None, 5])
    def test_invalid_ids(self, store: Any, bad: Any) -> None:
        with pytest.raises(errors.InvalidSession):
            store.put(bad, "qa", {})
        with pytest.raises(errors.InvalidSession):
            store.put("s1", bad, {})
        assert store.sessions() == []

    @pytest.mark.parametrize("bad", [[1, 2], "state", {"x": float("nan")}, {"x": object()}])
    def test_bad_state_writes_nothing(self, store: Any, bad: Any) -> None:
        with pytest.raises(errors.ValidationError) as info:
            store.put("s1", "qa", bad)
        assert info.value.errors[0]["field"] == "state"
        assert store.history("s1", "qa") == [] and store.sessions() == []

    def test_oversized_state(self, store: Any) -> None:
        with pytest.raises(errors.ValidationError, match="exceeds"):
            store.put("s1", "qa", {"blob": "x" * (store.max_state_bytes + 1)})
        assert store.sessions() == []

    def test_missing_get(self, store: Any) -> None:
        with pytest.raises(errors.ProgramNotFound, match="session 'nope'"):
            store.get("nope", "qa")

    def test_ids_with_colons_do_not_collide(self, store: Any) -> None:
        store.put("a:b", "c", {"who": 1})
        store.put("a", "b:c", {"who": 2})
        assert store.get("a:b", "c").state == {"who": 1}
        assert store.get("a", "b:c").state == {"who": 2}
