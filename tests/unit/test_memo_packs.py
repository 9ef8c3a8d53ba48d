"""Memos packed in the changelog (topology/runtime/memo_packs.py), against a plain dict: whatever a stage writes,
overwrites and expires — an hour's expiry split over several timer runs — the local store shows the same records
as the dict; a store caught up from the changelog (compacted or not, at any point) shows them too once its timer
ran (a pack's tombstone leaves the hour's memos to it); and once every hour has expired, the compacted changelog
holds no memo at all — packed ones, and ones an earlier version wrote as records of their own."""

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
expire_op = st.tuples(st.just("expire"), st.integers(0, 5), st.integers(1, 4))  # (cutoff hour, keys per run)
# a batch writes; a timer's transaction expires (agents/memo.py): never both in one
transactions = st.lists(st.one_of(st.lists(st.one_of(memo_op, memo_op, other_op), max_size=8), st.tuples(expire_op)), max_size=14)
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
    """A catch-up from the changelog's start, a record at a time."""
    store = StateStore(path)
    for offset, (key, record) in enumerate(changelog):
        store.apply(memo_packs.unpack(key, record, KINDS), offset + 1)
    return store


def commit(store: StateStore, tx: Transaction, changelog: Changelog) -> None:
    """What PartitionedStage._commit does: the changes to the changelog (memos packed), then to the store."""
    logged, markers = memo_packs.split(tx.changes, KINDS, tx.unlogged)
    changelog.extend((key, None if value is None else orjson.loads(value)) for key, value in logged.items())
    store.apply({**tx.changes, **markers}, len(changelog))


def timer(store: StateStore, cutoff: int, limit: int, changelog: Changelog) -> None:
    """One expiry run (hours before `cutoff` are past the horizon), at most `limit` keys."""
    tx = Transaction(store)
    memo_packs.expire(tx, KINDS, cutoff * HOUR_MS, 0, limit)
    commit(store, tx, changelog)


def past(key: str, cutoff: int) -> bool:
    return key[1:2] == "@" and int(key[2:10]) < cutoff


@settings(max_examples=150, deadline=None)
@given(legacy=legacy_memos, batches=transactions, compact_first=st.booleans(), upgraded=st.booleans(), limit=st.integers(1, 5))
def test_packed_memos_read_back_as_written_and_leave_with_their_hour(tmp_path_factory: Any, legacy: list[tuple[str, int, int]],
                                                                     batches: list[Any], compact_first: bool, upgraded: bool,
                                                                     limit: int) -> None:  # fmt: skip
    root = tmp_path_factory.mktemp("packs")
    changelog: Changelog = [(f"{kind}@{hour:08d}|m{n}", {"old": n}) for kind, hour, n in legacy]  # an earlier version's
    oracle: dict[str, Any] = {key: record for key, record in changelog}
    if upgraded:  # the earlier version's own store, opened by this one
        store = StateStore(root / "live")
        store.apply({key: orjson.dumps(record) for key, record in changelog}, len(changelog))
        memo_packs.mark_legacy(store, KINDS)
    else:  # caught up from that version's changelog
        store = rebuilt(root / "live", changelog)
    cutoff = 0
    for ops in batches:
        if ops and ops[0][0] == "expire":  # one timer run, which may leave part of the hours for the next
            cutoff = max(cutoff, ops[0][1])  # the horizon only moves on
            timer(store, cutoff, ops[0][2], changelog)
            oracle = {k: v for k, v in oracle.items() if not past(k, cutoff) or store.get(k) is not None}  # maybe not yet
            assert visible(store) == oracle
            continue
        tx = Transaction(store)
        for op in ops:
            if op[0] == "memo":
                _, kind, hour, n, value = op
                tx.put(f"{kind}@{hour:08d}|m{n}", {"v": value})
                oracle[f"{kind}@{hour:08d}|m{n}"] = {"v": value}
            else:
                key = f"p|{op[1]}"
                if op[2] is None:
                    tx.delete(key)
                    oracle.pop(key, None)
                else:
                    tx.put(key, {"v": op[2]})
                    oracle[key] = {"v": op[2]}
        commit(store, tx, changelog)
        assert visible(store) == oracle

    moved = rebuilt(root / "moved", list(compacted(changelog).items()) if compact_first else changelog)  # another owner
    timer(moved, cutoff, 10_000, changelog)  # its timer's first run
    assert visible(moved) == {k: v for k, v in oracle.items() if not past(k, cutoff)}

    for _ in range(200):  # every hour past the horizon, run after run on the new owner: nothing of any memo is left
        before = len(changelog)
        timer(moved, 10, limit, changelog)
        if len(changelog) == before and not any(k[1:2] == "@" for k in moved.keys("")):
            break
    left = [key for key in compacted(changelog) if key[1:2] == "@"]
    assert left == [], left


def test_a_transaction_writes_one_pack_per_kind_and_hour() -> None:
    changes = {f"r@00000001|m{n}": b'{"p":"x"}' for n in range(500)} | {"s@00000001|m1": b"{}", "p|1": b'{"a":1}'}
    logged, markers = memo_packs.split(changes, KINDS, set())
    assert sorted(k[:11] for k in logged) == ["p|1", "r@00000001#", "s@00000001#"]
    assert set(markers) == {k for k in logged if memo_packs.is_pack(k)}
    pack = next(orjson.loads(v) for k, v in logged.items() if k.startswith("r@"))  # type: ignore[arg-type]
    assert pack == {"pack": {f"r@00000001|m{n}": {"p": "x"} for n in range(500)}}
