"""One partition of a stage's records in RocksDB (rocksdict), mirrored from its partition of the stage's changelog
(cdp.identity.state, cdp.compute.state).

The changelog is the truth, the local store a cache of it: a batch's changes are written to the changelog
first and applied locally only once Kafka acknowledged them, together with the changelog offset they reach
(`changelog_next`). A worker that gets a partition, or restarts after a SIGKILL, reads the changelog from that
offset to its end, so the local store can never be ahead of what another worker would rebuild.

Keys under a *volatile* prefix (identity's claiming sagas, `c|`) live in memory only: never in RocksDB, never
in the changelog. The stage that declares them rebuilds them after a restart from its inputs (it holds the
input's committed offset back to what they need: topology/stages/identity.py).

Values are JSON (orjson) records of the stage's pure logic (agents/identity/protocol.py, agents/compute/engine.py);
`Transaction` gives that logic its state for one batch (an agents.state.Overlay over the store): reads fall
through to the store, writes collect as encoded changes.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
from rocksdict import WriteBatch

from agents.state import Overlay
from topology.runtime.rocks import open_db, recreate_db

_OFFSET = struct.Struct(">Q")
_CHANGELOG_NEXT = b"\x00changelog"
_APPLIED_AT = b"\x00applied_at"


class StateStore:
    """The records of one partition; changed only through `apply`, in one atomic batch."""

    def __init__(self, path: Path, volatile: tuple[str, ...] = ()) -> None:
        self.path, self.volatile = path, volatile
        self._db = open_db(path)
        self._memory: dict[str, bytes] = {}  # the volatile records

    def get(self, key: str) -> dict[str, Any] | None:
        if self.volatile and key.startswith(self.volatile):
            kept = self._memory.get(key)
            return None if kept is None else orjson.loads(kept)
        value = self._db.get(key.encode())
        return None if value is None else orjson.loads(value)

    def is_volatile(self, key: str) -> bool:
        return bool(self.volatile) and key.startswith(self.volatile)

    def logs(self, key: str, value: bytes | None) -> bool:
        """Whether a change goes to the changelog: not a volatile record's, and not the tombstone of a record the
        store (so the changelog, which it mirrors) does not hold — one written and deleted within a transaction
        (an identity saga that finished in the poll cycle it started in) leaves no trace."""
        if self.volatile and key.startswith(self.volatile):
            return False
        return value is not None or self._db.get(key.encode()) is not None

    def in_memory(self, key: str) -> bool:
        return key in self._memory

    def forget_volatile(self) -> bool:
        """Drop the volatile records (they no longer match the changelog); whether there were any."""
        had = bool(self._memory)
        self._memory.clear()
        return had

    def raw(self, key: str) -> bytes | None:
        value = self._db.get(key.encode())
        return None if value is None else bytes(value)

    def keys(self, prefix: str, after: str = "") -> Iterator[str]:
        """Keys under `prefix` in byte order, from the first one past `prefix + after` when `after` is given."""
        it = self._db.iter()
        start = prefix.encode()
        it.seek(start + after.encode())
        if after and it.valid() and it.key() == start + after.encode():
            it.next()
        while it.valid() and it.key().startswith(start):
            yield it.key().decode()
            it.next()

    @property
    def changelog_next(self) -> int | None:
        """The first changelog offset not reflected here; None for a store that never read its changelog."""
        value = self._db.get(_CHANGELOG_NEXT)
        return None if value is None else _OFFSET.unpack(value)[0]

    @property
    def applied_at(self) -> int | None:
        """Wall-clock ms of the last change applied; a copy much older may have missed compacted tombstones."""
        value = self._db.get(_APPLIED_AT)
        return None if value is None else _OFFSET.unpack(value)[0]

    def apply(self, changes: Mapping[str, bytes | None], changelog_next: int) -> None:
        self._write(changes, changelog_next)

    def mark(self, marks: Mapping[str, bytes | None]) -> None:
        """Write local-only records (marks the stage keeps about its records, never in the changelog); the
        changelog offset stays as it is."""
        self._write(marks, None)

    def _write(self, changes: Mapping[str, bytes | None], changelog_next: int | None) -> None:
        batch = WriteBatch(raw_mode=True)
        for key, value in changes.items():
            if self.volatile and key.startswith(self.volatile):
                if value is None:
                    self._memory.pop(key, None)
                else:
                    self._memory[key] = value
            elif value is None:
                batch.delete(key.encode())
            else:
                batch.put(key.encode(), value)
        if changelog_next is not None:
            batch.put(_CHANGELOG_NEXT, _OFFSET.pack(changelog_next))
            batch.put(_APPLIED_AT, _OFFSET.pack(int(time.time() * 1000)))
        self._db.write(batch)

    def reset(self) -> None:
        """Forget everything (the changelog was recreated, so this copy belongs to topics that are gone)."""
        self._db = recreate_db(self._db, self.path)
        self._memory.clear()

    def close(self) -> None:
        self._db.close()


class Transaction(Overlay):
    """A stage's state for one batch: reads see the batch's own writes, writes become `changes` (JSON), made durable
    by the stage at once. `store` is there for range reads (`keys`); `unlogged`: changes for the local store only
    (memos whose changelog record is their pack: topology/runtime/memo_packs.py)."""

    def __init__(self, store: StateStore) -> None:
        super().__init__(store)
        self.store = store
        self.unlogged: set[str] = set()
