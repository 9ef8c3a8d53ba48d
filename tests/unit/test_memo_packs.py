"""Memos packed in the changelog (topology/runtime/memo_packs.py), against a plain dict: whatever a stage writes,
overwrites and expires, the local store shows the same records as the dict, a store rebuilt from the (compacted)
changelog shows them too, and once every hour has expired the compacted changelog holds no memo at all — packed
ones, and ones an earlier version wrote as records of their own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.memo import HOUR_MS
from topology.runtime import memo_packs
from topology.runtime.state_store import StateStore, Transaction

KINDS = ("r", "s")
Changelog = list[tuple[str, Any]]  # (key, record or None), in offset order

memo_op = st.tuples(st.just("memo"), st.sampled_from(KINDS), st.integers(0, 3), st.integers(0, 6), st.integers(0, 9))
other_op = st.tuples(st.just("other"), st.integers(0, 4), st.one_of(st.none(), st.integers(0, 9)))
expire_op = st.tuples(st.just("expire"), st.integers(0, 5))
# a batch writes; a timer's transaction expires (agents/memo.py): never both in one
transactions = st.lists(st.one_of(st.lists(st.one_of(memo_op, memo_op, other_op), max_size=8), st.tuples(expire_op)), max_size=12)
legacy_memos = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 3), st.integers(0, 6)), max_size=6)


def visible(store: StateStore) -> dict[str, Any]:
    """What the stage's logic can read: every record but the packs' markers and the local marks."""
    return {key: store.get(key) for key in store.keys("")
            if not memo_packs.is_pack(key) and not key.startswith((memo_packs.LEGACY, "\x00"))}  # fmt: skip


def compacted(changelog: Changelog) -> dict[str, Any]:
    last: dict[str, Any] = {}
    for key, record in changelog:
        last[key] = record
    return {key: record for key, record in last.items() if record is not None}


def rebuilt(path: Path, changelog: Changelog) -> StateStore:
    store = StateStore(path)
    for offset, (key, record) in enumerate(changelog):  # one record a chunk, or all in one: the same
        pending: dict[str, bytes | None] = {}
        memo_packs.read_back(key, record, KINDS, pending, store)
        store.apply(pending, offset + 1)
    return store


@settings(max_examples=60, deadline=None)
@given(legacy=legacy_memos, batches=transactions, compact_first=st.booleans(), upgraded=st.booleans())
def test_packed_memos_read_back_as_written_and_leave_with_their_hour(tmp_path_factory: Any, legacy: list[tuple[str, int, int]],
                                                                     batches: list[Any], compact_first: bool, upgraded: bool) -> None:  # fmt: skip
    root = tmp_path_factory.mktemp("packs")
    changelog: Changelog = [(f"{kind}@{hour:08d}|m{n}", {"old": n}) for kind, hour, n in legacy]  # an earlier version's
    oracle: dict[str, Any] = {key: record for key, record in changelog}
    if upgraded:  # the earlier version's own store, opened by this one
        store = StateStore(root / "live")
        store.apply({key: orjson.dumps(record) for key, record in changelog}, len(changelog))
        memo_packs.mark_legacy(store, KINDS)
    else:  # caught up from that version's changelog
        store = rebuilt(root / "live", changelog)
    for ops in batches:
        tx = Transaction(store)
        for op in ops:
            if op[0] == "memo":
                _, kind, hour, n, value = op
                tx.put(f"{kind}@{hour:08d}|m{n}", {"v": value})
                oracle[f"{kind}@{hour:08d}|m{n}"] = {"v": value}
            elif op[0] == "other":
                key = f"p|{op[1]}"
                if op[2] is None:
                    tx.delete(key)
                    oracle.pop(key, None)
                else:
                    tx.put(key, {"v": op[2]})
                    oracle[key] = {"v": op[2]}
            else:
                cutoff = op[1]  # hours before it are past the horizon
                memo_packs.expire(tx, KINDS, cutoff * HOUR_MS, 0, 10_000)
                for key in [k for k in oracle if k[1:2] == "@" and int(k[2:10]) < cutoff]:
                    del oracle[key]
        logged, markers = memo_packs.split(tx.changes, KINDS, tx.unlogged)
        changelog.extend((key, None if value is None else orjson.loads(value)) for key, value in logged.items())
        store.apply({**tx.changes, **markers}, len(changelog))
        assert visible(store) == oracle

    source = list(compacted(changelog).items()) if compact_first else changelog
    assert visible(rebuilt(root / "rebuilt", source)) == oracle

    tx = Transaction(store)  # every hour past the horizon: nothing of any memo is left in the changelog
    memo_packs.expire(tx, KINDS, 10 * HOUR_MS, 0, 10_000)
    logged, markers = memo_packs.split(tx.changes, KINDS, tx.unlogged)
    changelog.extend((key, None if value is None else orjson.loads(value)) for key, value in logged.items())
    left = [key for key in compacted(changelog) if key[1:2] == "@"]
    assert left == [], left
    assert all(value is None for value in logged.values()) and not markers


def test_a_transaction_writes_one_pack_per_kind_and_hour() -> None:
    changes = {f"r@00000001|m{n}": b'{"p":"x"}' for n in range(500)} | {"s@00000001|m1": b"{}", "p|1": b'{"a":1}'}
    logged, markers = memo_packs.split(changes, KINDS, set())
    assert sorted(k[:11] for k in logged) == ["p|1", "r@00000001#", "s@00000001#"]
    assert set(markers) == {k for k in logged if memo_packs.is_pack(k)}
    pack = next(orjson.loads(v) for k, v in logged.items() if k.startswith("r@"))  # type: ignore[arg-type]
    assert pack == {"pack": {f"r@00000001|m{n}": {"p": "x"} for n in range(500)}}
