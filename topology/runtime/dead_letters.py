"""Dead letters: a record a stage gave up on, kept with the reason and its original bytes.

Bad input never stops a stage and never vanishes: whatever an input record raises while it is decoded or
applied (a BadEventError, or any other exception: a bug must cost one record, not the partition), the stage
turns it into one of these — here, and only here — writes it to the dead-letter topic, and moves on to the
next record. Only Kafka being unreachable, a fenced writer and deliberate waits (agents/errors.py) are retried.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from agents.errors import CdpError
from agents.events import DeadLetter
from topology.codecs import AvroCodec
from topology.runtime.producer import Record

MAX_REASON_CHARS = 2_000  # an error message quoting a 200 KB value must not make a 200 KB dead letter
MAX_COPIED_BYTES = 400_000  # of the original key and of its value: a dead letter must itself fit a Kafka record


def describe(error: BaseException) -> str:
    """The error in words, bounded: our own errors' messages name the ids involved; anything else (a bug) is shown
    with its class, e.g. "KeyError('event')"."""
    shown = str(error) if isinstance(error, CdpError) else repr(error)
    return shown if len(shown) <= MAX_REASON_CHARS else shown[: MAX_REASON_CHARS - 1] + "…"


def dead_letter(
    *, stage: str, error: BaseException, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
) -> DeadLetter:
    """The DeadLetter payload for one record read from `topic` at `partition`/`offset`. A key or value too large to
    copy whole is cut, and the reason says so (the original stays on its topic until retention)."""
    cut = [f"{name} of {len(data)} bytes cut to its first {MAX_COPIED_BYTES}" for name, data in (("key", key), ("value", value))
           if data is not None and len(data) > MAX_COPIED_BYTES]  # fmt: skip
    return DeadLetter(
        stage=stage,
        reason=f"{topic}[{partition}]@{offset}: {describe(error)}" + (f" ({'; '.join(cut)})" if cut else ""),
        error=type(error).__name__,
        topic=topic,
        partition=partition,
        offset=offset,
        key=key if key is None else key[:MAX_COPIED_BYTES],
        value=value if value is None else value[:MAX_COPIED_BYTES],
        destination=None,
        attempts=0,
        failed_at=int(time.time() * 1000),
        http_status=None,
        response=None,
    )


@dataclass(frozen=True)
class DeadLetters:
    """Where one stage's dead letters go: `record` is the one way every stage turns an exception into one."""

    stage: str
    topic: str
    codec: AvroCodec

    def record(self, error: BaseException, *, topic: str, partition: int, offset: int, key: bytes | None,
               value: bytes | None) -> Record:  # fmt: skip
        letter = dead_letter(stage=self.stage, error=error, topic=topic, partition=partition, offset=offset, key=key, value=value)
        return Record(self.topic, key, self.codec.encode(letter))
