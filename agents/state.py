"""The state a stage's logic works on, and how one step of it is made all or nothing.

Every stage's logic (agents/identity/protocol.py, agents/compute/engine.py) reads and writes one partition's
records through `State`; the stage keeps them in RocksDB with a changelog (topology/runtime/state_store.py). An
`Overlay` keeps a step's writes aside until `commit()`: a step that raises halfway (a malformed command, a bug)
is dropped whole instead of leaving half its changes behind, which is what lets a stage give up one record and
go on (topology/runtime/partitioned_stage.py).
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from agents.errors import InvalidRecord

Record = dict[str, Any]


class Readable(Protocol):
    """Records to read: a stage's store (the web views read it), or a `State`."""

    def get(self, key: str) -> Record | None: ...


class State(Readable, Protocol):
    """One partition's records to change; the caller makes a batch of changes durable at once."""

    def put(self, key: str, value: Record) -> None: ...

    def delete(self, key: str) -> None: ...


class Overlay:
    """Writes kept aside over `base` until `commit()`; reads see them. Records are stored as JSON, so a caller can't
    change a record it read without putting it back (as with a store's decoded copies)."""

    def __init__(self, base: Readable) -> None:
        """`base` needs `put` and `delete` (or `put_raw`) only for `commit`; a stage's Transaction never commits
        into its store (the stage applies `changes` once they are durable)."""
        self.base = base
        self.changes: dict[str, bytes | None] = {}

    def get(self, key: str) -> Record | None:
        if key in self.changes:
            value = self.changes[key]
            return None if value is None else orjson.loads(value)
        return self.base.get(key)

    def raw(self, key: str) -> bytes | None:
        """The record's JSON as kept (nothing decoded), for a caller that caches what it derives from it."""
        if key in self.changes:
            return self.changes[key]
        base_raw = getattr(self.base, "raw", None)
        if base_raw is not None:
            return base_raw(key)  # type: ignore[no-any-return]
        value = self.base.get(key)
        return None if value is None else orjson.dumps(value)

    def put(self, key: str, value: Record) -> None:
        self.changes[key] = orjson.dumps(value)

    def put_raw(self, key: str, value: bytes) -> None:
        """`value` already is a record's JSON."""
        self.changes[key] = value

    def delete(self, key: str) -> None:
        self.changes[key] = None

    def commit(self) -> None:
        """Hand the writes to `base` (as JSON when it takes JSON, so nothing is encoded twice)."""
        base: Any = self.base
        put_raw = getattr(base, "put_raw", None)
        for key, value in self.changes.items():
            if value is None:
                base.delete(key)
            elif put_raw is not None:
                put_raw(key, value)
            else:
                base.put(key, orjson.loads(value))
        self.changes.clear()


def keys_under(state: Any, prefix: str) -> list[str]:
    """The keys under `prefix` as `state` sees them, sorted: each overlay's writes and deletes over the keys of the
    store at the bottom (which must have `keys(prefix)`)."""
    decided: dict[str, bool] = {}
    layer = state
    while isinstance(layer, Overlay):
        for key, value in layer.changes.items():
            if key.startswith(prefix) and key not in decided:
                decided[key] = value is not None
        layer = layer.base
    kept = {key for key, present in decided.items() if present}
    return sorted(kept | {key for key in layer.keys(prefix) if key not in decided})


def check_sizes(overlay: Overlay, limit: int | None) -> None:
    """InvalidRecord if a step would make a record larger than `limit` bytes of JSON (None: no limit). The stages
    set it under what a Kafka record holds: a state record that outgrew it could never be written, and its
    partition would stall for good; refusing the step that grows it costs that step instead."""
    if limit is None:
        return
    for key, value in overlay.changes.items():
        if value is not None and len(value) > limit:
            raise InvalidRecord(f"the state record {key[:80]!r} would be {len(value)} bytes; records hold at most {limit}")
