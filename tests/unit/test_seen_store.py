"""The dedup stage's RocksDB memory: atomic remember, bounded by expiry, safe against re-sightings and resets."""

from __future__ import annotations

from pathlib import Path

from topology.runtime.seen_store import SeenStore


def test_remember_is_read_back_after_reopening(tmp_path: Path) -> None:
    store = SeenStore(tmp_path / "p0")
    assert store.next_offset is None and store.stream_time == 0 and store.next_input == 0
    store.remember({"a": 10, "b": 20}, next_offset=5, stream_time=20, next_input=7)
    store.close()
    store = SeenStore(tmp_path / "p0")
    assert dict(store) == {"a": 10, "b": 20}
    assert (store.next_offset, store.stream_time, store.next_input) == (5, 20, 7)
    assert store.get("c") is None and "a" in store


def test_stream_time_never_goes_back(tmp_path: Path) -> None:
    store = SeenStore(tmp_path / "p0")
    store.remember({}, next_offset=1, stream_time=100)
    store.remember({}, next_offset=1, stream_time=50)
    assert store.stream_time == 100


def test_forget_before_drops_only_old_sightings_and_keeps_re_sightings(tmp_path: Path) -> None:
    store = SeenStore(tmp_path / "p0")
    store.remember({"old": 1, "again": 2, "new": 50}, next_offset=3, stream_time=50)
    store.remember({"again": 60}, next_offset=4, stream_time=60)  # seen again after the window
    assert store.forget_before(40) == 2  # the time-index entries of `old` and the first `again`
    assert dict(store) == {"again": 60, "new": 50}
    assert store.forget_before(40) == 0


def test_reset_forgets_everything(tmp_path: Path) -> None:
    store = SeenStore(tmp_path / "p0")
    store.remember({"a": 1}, next_offset=9, stream_time=1, next_input=3)
    store.reset()
    assert len(store) == 0 and store.next_offset is None and store.next_input == 0
