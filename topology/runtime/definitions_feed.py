"""Every worker's live view of the definitions: the config file's, overlaid by the compacted cdp.definitions topic.

A definition POSTed to any worker is checked against the catalog it would join (a 400 names the problem), written
to cdp.definitions with the next version of its `kind:key`, and every worker's feed — a plain consumer of the
topic's single partition from its start, in a thread — picks it up within a poll: no restart. A record whose
version is not above the one held is ignored, so a replayed or raced write can't move a definition back.
The POST answers only once this worker's feed holds the new version (read-your-writes).

The topic is compacted and re-read from its start at every start, so a bad record there would be met again and
again: one that does not decode, or whose definition is invalid on its own (not a definition, another key than
its record's, nested too deep), is skipped, logged and counted (`skipped`, on /metrics) — never dead-lettered, never
allowed to stop the feed. One that is valid but refers to a definition not read yet is parked until it is. (The
size and list limits of new definitions are not applied here: what was accepted once stays readable.)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from agents.compute.catalog import Catalog, build_catalog, parse_audience
from agents.compute.definitions import parse_trait
from agents.compute.generations import Live
from agents.errors import CdpError, ConfigError, DeliveryFailed
from agents.sync.destinations import Destination, parse_destination
from topology.codecs import AvroCodec
from topology.destinations import CHECKS
from topology.runtime.producer import AsyncProducer, Record

log = logging.getLogger(__name__)
KINDS = {"traits": "trait", "audiences": "audience", "destinations": "destination"}


class Conflict(CdpError):
    """Two requests changed one definition at once; the other one won (HTTP 409)."""


@dataclass(frozen=True)
class Held:
    """One definition as the feed holds it."""

    kind: str
    key: str
    body: Mapping[str, Any]
    version: int
    updated_at: int | None  # None: from the config file


class DefinitionsFeed:
    def __init__(self, *, bootstrap: str, topic: str, codec: AvroCodec, traits: Sequence[Any], audiences: Sequence[Any],
                 destinations: Sequence[Any] = ()) -> None:  # fmt: skip
        self.bootstrap, self.topic, self.codec = bootstrap, topic, codec
        self._held: dict[tuple[str, str], Held] = {}
        for kind, items in (("trait", traits), ("audience", audiences), ("destination", destinations)):
            for body in items:
                key = body.get("name" if kind == "destination" else "key")
                self._held[(kind, str(key))] = Held(kind, str(key), body, 0, None)
        self.live: Live = self._build(self._held)
        self.destinations: Mapping[str, Destination] = _destinations(self._held, self.live.catalog)
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.caught_up = threading.Event()
        self._position = 0  # the next offset of the topic this feed will read
        self._end = 0  # the topic's end offset, as last seen
        self._asked: dict[int, float] = {}  # positions beyond the end seen so far that commands needed -> when first
        self._checked = 0.0  # when the feed thread last asked Kafka for the end (to answer `exists`)
        self._parked: dict[tuple[str, str], dict[str, Any]] = {}
        self._publishing = asyncio.Lock()
        self.skipped = 0  # records of the topic that were not definitions (see the module docstring)

    # -- reading -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._follow, name="definitions-feed", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def held(self, kind: str) -> list[Held]:
        return sorted((h for h in self._held.values() if h.kind == kind), key=lambda h: h.key)

    def version(self, kind: str, key: str) -> int | None:
        held = self._held.get((kind, key))
        return None if held is None else held.version

    def _follow(self) -> None:
        """Read the topic from its start, for good; a broker outage only delays, it never stops the feed."""
        while not self._stopping.is_set():
            consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"{self.topic}.feed",
                                 "enable.auto.commit": False, "enable.partition.eof": True})  # fmt: skip
            try:
                consumer.assign([TopicPartition(self.topic, 0, 0)])
                while not self._stopping.is_set():
                    for message in consumer.consume(num_messages=500, timeout=0.2):
                        error = message.error()
                        if error is None:
                            self._take(message.value())
                            self._reached(message.offset() + 1)
                        elif error.code() == KafkaError._PARTITION_EOF:
                            self._end = max(self._end, message.offset())
                            self._reached(message.offset())
                            self.caught_up.set()
                        else:
                            log.warning("definitions: reading %s: %s", self.topic, error)
                    if any(position > self._end for position in list(self._asked)):  # how far does the topic go?
                        self._end = max(self._end, consumer.get_watermark_offsets(TopicPartition(self.topic, 0), timeout=10)[1])
                        self._checked = time.monotonic()
            except Exception:  # the thread must outlive any one consumer
                log.exception("definitions: the feed failed; restarting it")
                time.sleep(1.0)
            finally:
                consumer.close()

    def _reached(self, position: int) -> None:
        """The feed has read (and taken or parked) everything before `position`: definitions are that recent."""
        with self._changed:
            self._position = max(self._position, position)
            if self._position > self.live.position:
                self.live = replace(self.live, position=self._position)
            self._changed.notify_all()

    def exists(self, position: int) -> bool:
        """Whether `position` is at most the topic's end: a command says its sender read definitions up to there,
        and one saying more (no worker ever read so far) could never be waited for. Never blocks: a position beyond
        the end seen so far is looked up by the feed thread; until it has answered, assume it exists (wait)."""
        if position <= self._end:
            self._asked.pop(position, None)
            return True
        if len(self._asked) > 1_000:  # bounded: forget what was asked long ago
            self._asked.clear()
        asked = self._asked.setdefault(position, time.monotonic())
        return self._checked <= asked or position <= self._end  # (the thread sets the end before the time)

    def _sync(self, timeout_s: float) -> None:
        """Wait until this feed has read everything written to the topic so far: a POST on any worker then sees
        every definition an earlier POST (on any worker) got a 201 for."""
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"{self.topic}.feed"})
        try:
            _, end = consumer.get_watermark_offsets(TopicPartition(self.topic, 0), timeout=timeout_s)
        finally:
            consumer.close()
        with self._changed:
            if not self._changed.wait_for(lambda: self._position >= end, timeout_s):
                raise DeliveryFailed(f"this worker has not read {self.topic} up to offset {end} within {timeout_s:.0f}s")

    def _take(self, value: bytes | None) -> None:
        """Hold (or park) the definition in one record of the topic. Raises only DeliveryFailed (the schema registry
        did not answer: the feed reads the topic again); a bad record is skipped (see the module docstring)."""
        if value is None:
            return  # a Kafka tombstone after a deletion record: the deletion was taken already
        try:
            record = self.codec.decode(value)
            if not record["deleted"]:
                _check_alone(record)
        except DeliveryFailed:
            raise  # the schema registry away: the feed reads the topic again, from its start, in a moment
        except Exception as exc:
            self.skipped += 1
            log.warning("definitions: a record of %s is not a definition; skipped: %s", self.topic, exc)
            return
        ident = (record["kind"], record["key"])
        if record["version"] < (self.version(*ident) or 0) and ident in self._held:
            return  # at the same version the later record wins, as compaction will decide for a fresh reader
        self._parked[ident] = record
        self._unpark()

    def _unpark(self) -> None:
        """Take every parked record that fits now. A record can arrive before one it depends on (an audience
        before its trait, once compaction has dropped the trait's first version): it waits here, not lost."""
        progress = True
        while progress and self._parked:
            progress = False
            for ident, record in list(self._parked.items()):
                held = dict(self._held)
                if record["deleted"]:
                    held.pop(ident, None)
                else:
                    held[ident] = Held(record["kind"], record["key"], record["body"], record["version"], record["updated_at"])
                try:
                    live = self._build(held)
                    destinations = _destinations(held, live.catalog)
                except ConfigError as exc:
                    log.info("definitions: %s %s v%d waits for what it refers to (%s)", *ident, record["version"], exc)
                    continue
                except Exception as exc:  # checked alone it was fine; nothing may stop the feed: drop it
                    del self._parked[ident]
                    self.skipped += 1
                    log.warning("definitions: %s %s v%d can't be taken; skipped: %r", *ident, record["version"], exc)
                    continue
                del self._parked[ident]
                progress = True
                with self._changed:
                    self._held, self.live = held, replace(live, position=self.live.position)
                    self.destinations = destinations
                    self._changed.notify_all()

    @staticmethod
    def _build(held: Mapping[tuple[str, str], Held]) -> Live:
        """The traits and audiences as compute runs them (the destinations: `_destinations`)."""
        ordered = sorted(held.values(), key=lambda h: (h.updated_at or 0, h.key))
        catalog = build_catalog([h.body for h in ordered if h.kind == "trait"], [h.body for h in ordered if h.kind == "audience"])
        return Live.of(catalog, {ident: h.version for ident, h in held.items()})

    @property
    def catalog(self) -> Catalog:
        return self.live.catalog

    # -- writing -----------------------------------------------------------------------------------------------

    def check(self, kind: str, body: Any) -> str:
        """The definition's key if it fits the current catalog; ConfigError naming the problem otherwise."""
        if kind == "destination":
            return parse_destination(body, CHECKS, audiences=self.catalog.audiences).name
        if not isinstance(body, Mapping):
            raise ConfigError(f"a {kind} definition is a JSON object, not {body!r}")
        self.catalog.with_definition(kind, body)
        return str(body["key"])

    async def publish(self, kind: str, body: Mapping[str, Any], producer: AsyncProducer, timeout_s: float = 30.0) -> Held:
        """Check against everything written so far, write with the next version, wait until the feed holds it."""
        async with self._publishing:  # one at a time per worker; Conflict covers a race with another worker
            await asyncio.to_thread(self._sync, timeout_s)
            key = self.check(kind, body)
            version = (self.version(kind, key) or 0) + 1
            record = {"kind": kind, "key": key, "body": dict(body), "version": version,
                      "updated_at": int(time.time() * 1000), "deleted": False}  # fmt: skip
            await producer.write_all([Record(self.topic, f"{kind}:{key}".encode(), self.codec.encode(record), 0)])
            await asyncio.to_thread(self._sync, timeout_s)  # everything up to our record, and any racing one
            held = self._held.get((kind, key))
            if held is None or held.version != version or held.body != record["body"]:
                raise Conflict(f"{kind} {key!r} was changed by another request at the same time; GET it and retry")
            return held



    async def disable(self, name: str, reason: str, producer: AsyncProducer) -> None:
        """Turn a destination off for every worker (a 410 from it): its definition again, with `disabled` set, until a
        user POSTs it again. Nothing if it is gone or off already."""
        held = self._held.get(("destination", name))
        if held is not None and not held.body.get("disabled"):
            await self.publish("destination", {**held.body, "disabled": {"at": int(time.time() * 1000), "reason": reason}}, producer)


def _destinations(held: Mapping[tuple[str, str], Held], catalog: Catalog) -> dict[str, Destination]:
    """The destinations as the sync stage runs them; ConfigError if one is wrong (an audience it filters on is gone)."""
    return {h.key: parse_destination(h.body, CHECKS, audiences=catalog.audiences) for h in held.values() if h.kind == "destination"}


def _check_alone(record: Mapping[str, Any]) -> None:
    """ConfigError if a record's definition is wrong by itself (whatever else is defined): it can never be taken."""
    body = record["body"]
    if record["kind"] == "destination":
        if parse_destination(body, CHECKS).name != record["key"]:
            raise ConfigError(f"the record's key {record['key']!r} is not its destination's name {body.get('name')!r}")
        return
    definition = parse_trait(body) if record["kind"] == "trait" else parse_audience(body)
    if definition.key != record["key"]:
        raise ConfigError(f"the record's key {record['key']!r} is not its definition's key {definition.key!r}")
