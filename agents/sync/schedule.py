"""Which queued deliveries of one destination are ready to send, in memory (the queue itself is in the state:
agents/sync/queue.py).

One entry per (partition, profile): the key of the profile's next delivery to send (its *head*) and when it is due.
`take` hands out due heads and marks them busy; a busy profile is not handed out again until its attempt is done
(`set_head(..., done=<that key>)` with whatever is next now, or `clear`) or `release`d (its outcome could not be
written: it goes again). A head that an input batch re-reads unchanged stays busy: the attempt in flight is for it.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

Slot = tuple[int, str]  # (partition, profile)


@dataclass
class Schedule:
    heads: dict[Slot, tuple[int, str]] = field(default_factory=dict)  # slot -> (due ms, key)
    busy: dict[Slot, str] = field(default_factory=dict)  # slot -> the key in flight
    _heap: list[tuple[int, int, str, str]] = field(default_factory=list)  # (due, partition, profile, key), lazy

    def set_head(self, partition: int, profile: str, key: str, due: int, *, done: str | None = None) -> None:
        """`done`: the key whose attempt just ended (it no longer holds the profile busy)."""
        slot = (partition, profile)
        busy = self.busy.get(slot)
        freed = busy is not None and (busy == done or busy != key) and self.busy.pop(slot, None) is not None
        if self.heads.get(slot) != (due, key) or freed:  # a busy head's heap entry may have been dropped: push again
            self.heads[slot] = (due, key)
            heapq.heappush(self._heap, (due, partition, profile, key))

    def clear(self, partition: int, profile: str) -> None:
        self.heads.pop((partition, profile), None)
        self.busy.pop((partition, profile), None)

    def release(self, partition: int, profile: str) -> None:
        """An attempt whose outcome was not written: its head is ready again."""
        slot = (partition, profile)
        self.busy.pop(slot, None)
        if slot in self.heads:
            due, key = self.heads[slot]
            heapq.heappush(self._heap, (due, partition, profile, key))

    def drop_partition(self, partition: int) -> None:
        for slot in [slot for slot in self.heads if slot[0] == partition]:
            self.clear(*slot)

    def take(self, now: int, limit: int) -> list[tuple[int, str, str]]:
        """Up to `limit` due heads not in flight, earliest first, as (partition, profile, key); marked busy."""
        taken: list[tuple[int, str, str]] = []
        while self._heap and len(taken) < limit and self._heap[0][0] <= now:
            due, partition, profile, key = heapq.heappop(self._heap)
            slot = (partition, profile)
            if self.heads.get(slot) != (due, key) or slot in self.busy:
                continue  # stale (the head moved on) or in flight
            self.busy[slot] = key
            taken.append((partition, profile, key))
        return taken

    def next_due(self) -> int | None:
        """When the earliest head not in flight is due; None if there is none."""
        while self._heap:
            due, partition, profile, key = self._heap[0]
            slot = (partition, profile)
            if self.heads.get(slot) == (due, key) and slot not in self.busy:
                return due
            heapq.heappop(self._heap)
        return None

    def waiting(self) -> int:
        return len(self.heads)
