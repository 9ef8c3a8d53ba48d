"""Dead letters: a record a stage gave up on, kept with the reason and its original bytes.

Bad input never stops a stage and never vanishes: the stage writes one of these to the dead-letter topic in
the same acknowledged write as its outputs, then moves on to the next record.
"""

from __future__ import annotations

import time

from agents.errors import CdpError
from agents.events import DeadLetter


def dead_letter(
    *, stage: str, error: CdpError, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
) -> DeadLetter:
    """The DeadLetter payload for one record read from `topic` at `partition`/`offset`."""
    return DeadLetter(
        stage=stage,
        reason=f"{topic}[{partition}]@{offset}: {error}",
        error=type(error).__name__,
        topic=topic,
        partition=partition,
        offset=offset,
        key=key,
        value=value,
        destination=None,
        attempts=0,
        failed_at=int(time.time() * 1000),
    )
