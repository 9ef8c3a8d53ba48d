"""Per-event memos go to the changelog in packs: one record per memo kind and hour for a whole transaction.

Every event leaves a memo or two (agents/memo.py: identity's resolution `r@`, compute's `s@`), and as records
of their own they were a quarter of what the pipeline wrote to Kafka per event (`identity.state` and
`compute.state`: 2.6 of 11.6 records). A memo is only ever written, read back locally, and deleted with its
whole hour once the hour passes the memo horizon — it never needs a changelog record of its own. So a
transaction's memo changes go out as *packs*: `<kind>@<hour>#<unique id>` → {"pack": {memo key: record or
null}}, one per kind and hour (split under PACK_BYTES). The local store keeps the memos under their own keys as
before (the stage's logic sees no difference) plus each pack's key with an empty record, so the hour's expiry,
which deletes every key under `<kind>@<hour>`, deletes the packs too: tombstones go to the changelog for the
packs only, the memos leave the local store without one (`Transaction.unlogged`).

Packs of one hour never share a key (a random id), so compaction never drops one for another; a catch-up
applies them in changelog order, so a memo written again later (identity's `via`, then its resolution, on one
partition) ends with its last value. Memos an earlier version wrote as records of their own are marked locally
when a catch-up reads them (`LEGACY`), so their expiry still writes their tombstones.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import orjson

from agents import memo
from topology.runtime.state_store import StateStore, Transaction

PACK = "#"  # after `<kind>@<hour>`: a pack; `|` there: a memo
PACK_BYTES = 256_000  # a pack's JSON stays about this small (a Kafka record holds 1 MB)
LEGACY = "\x01memo|"  # local only: `LEGACY + key` marks a memo the changelog holds as a record of its own
MARKED = "\x00memo-packs"  # local only: the store's memos from before packs are marked (`mark_legacy`)
PACK_MARKER = b"{}"  # a pack's local record: only its key matters (expiry finds and tombstones it)
CATCH_UP_ENTRIES = 50_000  # a catch-up applies what it unpacked in chunks of about this many entries
_HOUR = re.compile(r"([a-z]+)@(\d{8})([|#])")


def memo_parts(key: str, kinds: Sequence[str]) -> tuple[str, str, bool] | None:
    """(kind, hour, is a pack) of a memo or pack key of one of `kinds`; None for any other key (most of a batch's:
    a cheap prefix test before the pattern, this runs on every change a stage commits)."""
    if not kinds or not key.startswith(tuple(f"{kind}@" for kind in kinds)):
        return None
    match = _HOUR.match(key)
    return None if match is None else (match.group(1), match.group(2), match.group(3) == PACK)


def is_pack(key: str) -> bool:
    match = _HOUR.match(key)
    return match is not None and match.group(3) == PACK


def split(changes: Mapping[str, bytes | None], kinds: Sequence[str], unlogged: set[str]
          ) -> tuple[dict[str, bytes | None], dict[str, bytes]]:  # fmt: skip
    """A transaction's changes as the changelog takes them: memos packed, `unlogged` keys left out, the rest as
    they are. Returns (changelog key -> JSON or None, the packs' local markers to apply with the changes)."""
    logged: dict[str, bytes | None] = {}
    packs: dict[tuple[str, str], list[bytes]] = {}
    for key, value in changes.items():
        if key in unlogged:
            continue
        parts = memo_parts(key, kinds)
        if parts is None or parts[2] or (value is None and LEGACY + key in changes):  # a legacy memo's tombstone too
            logged[key] = value
            continue
        packs.setdefault(parts[:2], []).append(orjson.dumps(key) + b":" + (b"null" if value is None else value))
    markers: dict[str, bytes] = {}
    for (kind, hour), entries in packs.items():
        for chunk in _chunks(entries):
            key = f"{kind}@{hour}{PACK}{os.urandom(8).hex()}"
            logged[key] = b'{"pack":{' + b",".join(chunk) + b"}}"
            markers[key] = PACK_MARKER
    return logged, markers


def unpack(key: str, record: dict[str, object] | None, kinds: Sequence[str]) -> dict[str, bytes | None]:
    """What a changelog record read back changes in the local store: a pack's memos and its marker, a memo of its
    own with its legacy mark, anything else as it is. A pack's tombstone removes its marker only: its hour expired,
    and the timer's next run deletes the hour's memos (no tombstone of their own) as it did where they were
    written — a catch-up never scans an hour, nor deletes another pack's marker or a legacy memo's mark that the
    timer still needs."""
    parts = memo_parts(key, kinds)
    if parts is None:
        return {key: None if record is None else orjson.dumps(record)}
    if parts[2]:
        if record is None:
            return {key: None}
        pack = record.get("pack")
        found: dict[str, bytes | None] = {k: None if v is None else orjson.dumps(v) for k, v in pack.items()} if isinstance(pack, dict) else {}
        found[key] = PACK_MARKER
        return found
    if record is None:
        return {key: None, LEGACY + key: None}
    return {key: orjson.dumps(record), LEGACY + key: PACK_MARKER}


def mark_legacy(store: StateStore, kinds: Sequence[str]) -> None:
    """Once per store: mark the memos a version before packs wrote into it (each a changelog record of its own),
    so their expiry still writes their tombstones. Stores caught up from the changelog since are marked as they
    read (`unpack`)."""
    if store.raw(MARKED) is not None:
        return
    marks: dict[str, bytes | None] = {}
    for kind in kinds:
        for key in store.keys(f"{kind}@"):
            if not is_pack(key):
                marks[LEGACY + key] = PACK_MARKER
            if len(marks) >= CATCH_UP_ENTRIES:
                store.mark(marks)
                marks.clear()
    store.mark({**marks, MARKED: PACK_MARKER})


def expire(tx: Transaction, kinds: Sequence[str], now_ms: int, horizon_ms: int, limit: int) -> int:
    """Delete memos and packs of `kinds` whose hour is past the horizon, oldest first, at most `limit` keys: the
    packs (and legacy memos) with a tombstone in the changelog, the packed memos locally only. How many memos."""
    deleted = count = 0
    for kind in kinds:
        for key in memo.expired(tx.store.keys, kind, now_ms, horizon_ms, limit - deleted):
            tx.delete(key)
            deleted += 1
            if is_pack(key):
                continue
            count += 1
            legacy = LEGACY + key
            if tx.store.raw(legacy) is not None:  # the changelog holds it as a record of its own: tombstone that
                tx.delete(legacy)
                tx.unlogged.add(legacy)
            else:
                tx.unlogged.add(key)
    return count


def _chunks(entries: list[bytes]) -> list[list[bytes]]:
    chunks: list[list[bytes]] = [[]]
    size = 0
    for entry in entries:
        if size and size + len(entry) > PACK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(entry)
        size += len(entry) + 1
    return chunks
