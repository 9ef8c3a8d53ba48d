"""messageId deduplication: which accepted calls are first sightings.

Reads:  RawEvents of one partition of cdp.events.accepted, in offset order.
Yields: the positions of the events whose messageId was not passed on within the window, each with its
        stream time, and the sightings to remember.
State:  messageId -> stream time of its last passed sighting, plus the partition's stream time (a Mapping; the
        caller persists new entries only after the outputs are acknowledged, which makes the stage crash-safe).
Errors: none.

Time is *stream time*: the largest received_at seen so far in the partition. Several ingest processes stamp
received_at with their own clocks, so raw received_at can step backwards; stream time never does, which makes
"within the window" a property of the partition's order alone. The same input therefore gets the same
decisions on every replay, in any batching.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agents.events import RawEvent


@dataclass
class Sightings:
    """The outcome of one batch: which inputs pass (index, stream time), what to remember, the new stream time."""

    passed: list[tuple[int, int]] = field(default_factory=list)
    remember: dict[str, int] = field(default_factory=dict)
    stream_time: int = 0


def first_sightings(events: Iterable[RawEvent], seen: Mapping[str, int], window_ms: int, stream_time: int) -> Sightings:
    """Decide one batch of one partition; a messageId passed less than `window_ms` of stream time ago is dropped."""
    out = Sightings(stream_time=stream_time)
    for index, event in enumerate(events):
        out.stream_time = max(out.stream_time, event["received_at"])
        message_id = event["message_id"]
        last = out.remember.get(message_id)
        if last is None:
            last = seen.get(message_id)
        if last is not None and out.stream_time - last < window_ms:
            continue
        out.remember[message_id] = out.stream_time
        out.passed.append((index, out.stream_time))
    return out
