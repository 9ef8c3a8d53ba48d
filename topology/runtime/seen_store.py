"""The dedup stage's memory: messageId -> stream time of its last passed sighting, one RocksDB (rocksdict) per partition.

Its changelog is cdp.events.raw itself. Every first sighting the stage passes on lands in the raw topic, in
the same partition number as its input, so the raw partition *is* the log of this store: the store keeps the
raw offset it reflects (`next_offset`) and, when a partition is (re)assigned, reads the raw partition from
there to its end. A worker killed between "written to raw" and "input offset committed" therefore finds its
own outputs on restart and drops the re-read inputs instead of writing them twice; no separate changelog
topic can drift from the outputs, because there is none.

Layout (one key space, ordered): b"m" + messageId -> stream time (8 bytes, big-endian);
b"t" + stream time + messageId -> b"" (a time index, so expiry is a short range scan);
b"\\x00next" -> the next raw offset not yet reflected; b"\\x00time" -> the partition's stream time;
b"\\x00input" -> the next input offset not yet applied (inputs below it are skipped when re-read after a crash).
Times are stream times (see agents/ingest/dedup.py); the raw records carry them as their Kafka timestamps.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

from rocksdict import WriteBatch

from topology.runtime.rocks import open_db, recreate_db

_TIME = struct.Struct(">Q")
_NEXT = b"\x00next"
_STREAM_TIME = b"\x00time"
_NEXT_INPUT = b"\x00input"


class SeenStore(Mapping[str, int]):
    """The sightings of one partition; writes go through `remember` only, in one atomic batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_db(path)

    def __getitem__(self, message_id: str) -> int:
        value = self._db.get(b"m" + message_id.encode())
        if value is None:
            raise KeyError(message_id)
        return _TIME.unpack(value)[0]

    def get(self, message_id: str, default: int | None = None) -> int | None:  # type: ignore[override]
        value = self._db.get(b"m" + message_id.encode())
        return default if value is None else _TIME.unpack(value)[0]

    def __iter__(self) -> Iterator[str]:
        it = self._db.iter()
        it.seek(b"m")
        while it.valid() and it.key()[:1] == b"m":
            yield it.key()[1:].decode()
            it.next()

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @property
    def next_offset(self) -> int | None:
        """The first raw offset this store does not reflect yet; None for a store that never caught up."""
        value = self._db.get(_NEXT)
        return None if value is None else _TIME.unpack(value)[0]

    @property
    def stream_time(self) -> int:
        """The largest received_at the partition has seen (0 for a new store)."""
        value = self._db.get(_STREAM_TIME)
        return 0 if value is None else _TIME.unpack(value)[0]

    @property
    def next_input(self) -> int:
        """The first input offset not applied yet: a re-read input below it was decided and written already."""
        value = self._db.get(_NEXT_INPUT)
        return 0 if value is None else _TIME.unpack(value)[0]

    def remember(self, sightings: Mapping[str, int], next_offset: int, stream_time: int, next_input: int | None = None) -> None:
        """Record passed sightings with the raw offset, stream time and input offset they reach, atomically."""
        batch = WriteBatch(raw_mode=True)
        batch.put(_STREAM_TIME, _TIME.pack(max(stream_time, self.stream_time, 0)))
        if next_input is not None:
            batch.put(_NEXT_INPUT, _TIME.pack(next_input))
        for message_id, received_at in sightings.items():
            key = message_id.encode()
            stamp = _TIME.pack(max(received_at, 0))
            batch.put(b"m" + key, stamp)
            batch.put(b"t" + stamp + key, b"")
        batch.put(_NEXT, _TIME.pack(next_offset))
        self._db.write(batch)

    def forget_before(self, cutoff_ms: int) -> int:
        """Drop sightings older than `cutoff_ms`, keeping the state bounded by the dedup window."""
        batch = WriteBatch(raw_mode=True)
        dropped = 0
        it = self._db.iter()
        it.seek(b"t")
        while it.valid() and it.key()[:1] == b"t":
            key = it.key()
            if _TIME.unpack(key[1:9])[0] >= cutoff_ms:
                break
            batch.delete(key)
            if self._db.get(b"m" + key[9:]) == key[1:9]:  # not re-sighted since: the entry is this one
                batch.delete(b"m" + key[9:])
            dropped += 1
            it.next()
        if dropped:
            self._db.write(batch)
        return dropped

    def reset(self) -> None:
        """Forget everything: raw offsets went backwards, so the topics were recreated and the store is stale."""
        self._db = recreate_db(self._db, self.path)

    def close(self) -> None:
        self._db.close()
