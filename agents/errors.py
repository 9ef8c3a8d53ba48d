"""The exception tree of the pipeline.

    CdpError
     ├── ConfigError          bad settings or environment; raised at start, the process exits
     │    └── LocalKafkaError the embedded broker can't be installed, started or reached
     ├── BadEventError        one record is wrong; it is dead-lettered and the stage goes on
     │    ├── UndecodableError   bytes on a topic that no known schema reads
     │    ├── InvalidRecord      a record that decodes but breaks what its topic promises (a field's meaning)
     │    └── InvalidMessage     a Tracking API message that breaks the spec (HTTP 400)
     ├── OverloadedError      the pipeline can't take more right now (HTTP 429, `retry_after`)
     ├── Waiting              a stage deliberately waits for something (e.g. newer definitions); retried
     └── DeliveryFailed       Kafka (or the schema registry) did not answer; nothing was promised, the caller may retry

What a stage does with an error while it applies an input record (topology/runtime/partitioned_stage.py): Waiting and
DeliveryFailed (Kafka unreachable, a fenced writer) are retried, and the partition shows as waiting or stalled
on /metrics; *anything else* — a BadEventError or a bug's exception — dead-letters that one record and the
partition goes on.

Every message names the ids involved, so a log line is enough to find the record.
"""

from __future__ import annotations


class CdpError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(CdpError):
    """Settings or the environment can't work; the process should stop with this message."""


class LocalKafkaError(ConfigError):
    """The embedded single-node Kafka can't be installed, started or reached."""


class BadEventError(CdpError):
    """One record can't be processed; it goes to a dead-letter topic and the stage continues."""


class UndecodableError(BadEventError):
    """Bytes on a topic that are not a payload of any known schema version."""


class InvalidRecord(BadEventError):
    """A record that decodes but can't be what its topic promises, e.g. a RawEvent whose `context` is a JSON string,
    a merge whose survivor is the younger profile, a command without a field its kind needs."""


class InvalidMessage(BadEventError):
    """A Tracking API message that breaks the spec; `field` names the offending field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class OverloadedError(CdpError):
    """Too much in flight; the caller should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Waiting(CdpError):
    """A stage can't act on a record *yet* and must not skip it (e.g. its definitions feed is behind the record's):
    retried with back-off, shown as a waiting partition, never dead-lettered."""


class DeliveryFailed(CdpError):
    """Kafka did not acknowledge a write (timeout, broker down), or the schema registry did not answer a read; the
    caller may retry the whole step. Never a record's fault, so never a reason to dead-letter one."""
