"""The whole pipeline in one place: which stage reads which topic, writes which, keyed by what, with what state.

Read this file first. `STAGES` is the graph as data (what `cdp topology` prints); `build()` wires the same
edges into a Faust app for a worker, and `ingest_server()` builds the HTTP ingest. Only stages that work are
wired; the other topics of the product are declared in topology/topics.py and created by `cdp topics`.

    HTTP /v1/* ──▶ ingest ──▶ cdp.events.accepted ──▶ dedup ──▶ cdp.events.raw ──▶ identity ──▶ cdp.events.resolved ─┐
                                                         └──▶ cdp.events.dead-letter     │  ▲   └──▶ cdp.identity.merges ──┤
                                                                 cdp.identity.commands ──┘  │        (state: cdp.identity.state)
                                                                                └───────────┘                             ▼
          cdp.definitions (compacted; every worker follows it) ──▶ compute ◀──▶ cdp.compute.commands   (state: cdp.compute.state)
                                                                     └──▶ cdp.profile.changes, cdp.audience.membership
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
from faust.types import TP

from agents.identity.protocol import IdentityProtocol
from topology import worker_web
from topology.codecs import AvroCodec, SchemaRepository
from topology.compute_stage import TICK_S, ComputeCodecs, ComputeStage, ComputeTopics
from topology.compute_views import ComputeViews
from topology.config import Settings
from topology.dedup_stage import DedupStage
from topology.definitions_feed import DefinitionsFeed
from topology.gc_tuning import freeze_start_up, gc_seconds
from topology.http import IngestServer
from topology.http_common import json_errors, json_protocol_errors
from topology.identity_stage import IdentityCodecs, IdentityStage, IdentityTopics
from topology.identity_views import IdentityViews
from topology.input_feed import InputFeed, commit_offsets, never_fetch
from topology.metrics import Metric, process_cpu
from topology.pipeline_lag import KafkaLagReader, PipelineLag, pipeline_group
from topology.producer import MAX_RECORD_BYTES, AsyncProducer, producer_config
from topology.routing import Router
from topology.shutdown import watch_shutdown
from topology.stage_cpu import stage_cpu
from topology.stalls import PartitionHealth, blocked_metrics
from topology.topics import (
    ALL_TOPICS, AUDIENCE_MEMBERSHIP, COMPUTE_COMMANDS, COMPUTE_STATE, DEFINITIONS, EVENTS_ACCEPTED, EVENTS_DEAD_LETTER,
    EVENTS_RAW, EVENTS_RESOLVED, IDENTITY_COMMANDS, IDENTITY_MERGES, IDENTITY_STATE, PROFILE_CHANGES, TopicSpec,
)  # fmt: skip


log = logging.getLogger(__name__)
COMMIT_INTERVAL_S = 1.0  # input offsets committed to the group: what a crash re-reads at most, what the lag counts
MEMO_SWEEP_S = 10.0  # how often identity and compute drop memos past the horizon (agents/memo.py)


@dataclass(frozen=True)
class StageSpec:
    """One stage as a user sees it: where it runs, what it reads and writes, what state it keeps."""

    name: str
    runs_in: str
    reads: tuple[TopicSpec | str, ...]  # a str is an outside source, e.g. HTTP
    writes: tuple[TopicSpec, ...]
    state: tuple[str, ...] = ()
    doc: str = ""
    copartitioned: tuple[TopicSpec, ...] = ()  # must share a partition count: partition N of each meets at one owner


STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        "ingest", "cdp ingest (HTTP, stateless; run N)", ("HTTP POST /v1/{track,identify,page,screen,group,alias,batch,import}",),
        (EVENTS_ACCEPTED,), (),
        "validates Segment calls, answers 200 after Kafka acks=all; key messageId",
    ),
    StageSpec(
        "dedup", "cdp worker (stage 'dedup', read in batches beneath Faust)", (EVENTS_ACCEPTED,), (EVENTS_RAW, EVENTS_DEAD_LETTER),
        ("seen-by-message-id: RocksDB per partition, changelog = events.raw",),
        "first sighting of each messageId within ingest.dedup_window passes, to the same partition number",
        (EVENTS_ACCEPTED, EVENTS_RAW),
    ),
    StageSpec(
        "identity", "cdp worker (stage 'identity', read in batches beneath Faust)", (EVENTS_RAW, IDENTITY_COMMANDS),
        (EVENTS_RESOLVED, IDENTITY_MERGES, IDENTITY_COMMANDS, IDENTITY_STATE, EVENTS_DEAD_LETTER),
        ("identifiers, profiles, sagas: RocksDB per partition, changelog = identity.state",),
        "resolves every identifier to one profile; owners per identifier/profile/event talk over identity.commands",
        (EVENTS_RAW, IDENTITY_COMMANDS, IDENTITY_STATE),
    ),
    StageSpec(
        "compute", "cdp worker (stage 'compute', read in batches beneath Faust)", (EVENTS_RESOLVED, IDENTITY_MERGES, COMPUTE_COMMANDS, DEFINITIONS),
        (PROFILE_CHANGES, AUDIENCE_MEMBERSHIP, COMPUTE_COMMANDS, COMPUTE_STATE, EVENTS_DEAD_LETTER),
        ("trait states, memberships, merge forwards: RocksDB per partition, changelog = compute.state",),
        "computed traits and audiences per profile, folded on merges, windows slid by a clock; changes exactly once",
        (EVENTS_RESOLVED, IDENTITY_MERGES, COMPUTE_COMMANDS, COMPUTE_STATE),
    ),
)  # fmt: skip


def copartitioned_pairs() -> tuple[tuple[TopicSpec, TopicSpec], ...]:
    """Every topic a stage co-partitions, paired with the stage's first: what `cdp worker` checks at start."""
    return tuple((stage.copartitioned[0], other) for stage in STAGES for other in stage.copartitioned[1:])


@dataclass
class Codecs:
    """One codec per topic, registered under `<topic>-value` when a schema registry is configured."""

    settings: Settings
    repository: SchemaRepository = field(default_factory=SchemaRepository.load)
    _cache: dict[str, AvroCodec] = field(default_factory=dict)

    def for_topic(self, spec: TopicSpec) -> AvroCodec:
        name = spec.name(self.settings)
        if name not in self._cache:
            registry = schema_registry(self.settings.schema_registry_url)
            self._cache[name] = AvroCodec(spec.schema, self.repository, registry=registry, subject=f"{name}-value")
        return self._cache[name]


def schema_registry(url: str | None) -> Any:
    """A Schema Registry client for `url` (`mock://...` gives confluent-kafka's in-process mock), or None."""
    if not url:
        return None
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return SchemaRegistryClient.new_client({"url": url})


@dataclass
class Graph:
    """A wired worker: the Faust app and the stage objects behind its agents (for metrics and tests)."""

    app: faust.App
    dedup: DedupStage
    identity: IdentityStage
    compute: ComputeStage
    definitions: DefinitionsFeed


def worker_data_dir(settings: Settings) -> Path:
    """Per worker, so several workers on one host don't share RocksDB files (keyed by the web port)."""
    return settings.data_dir / f"worker-{settings.web_port}"


def create_app(settings: Settings) -> faust.App:
    """The Faust app with the settings every stage relies on (docs/design.md says why for each)."""
    worker_data_dir(settings).mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    return faust.App(
        pipeline_group(settings),  # the app id is the consumer group the ingest reads the lag of
        broker=f"kafka://{settings.kafka_bootstrap}",
        datadir=str(worker_data_dir(settings)),
        topic_partitions=settings.topics.partitions,
        topic_replication_factor=settings.topics.replication,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        processing_guarantee="at_least_once",
        stream_wait_empty=True,
        broker_commit_interval=1.0,
        broker_session_timeout=15.0,  # a dead worker's partitions move after 15 s, not Faust's 60 s
        web_port=settings.web_port,
        web_bind=settings.web_bind,  # views show personal data: loopback unless CDP_WEB_BIND says otherwise
        canonical_url=f"http://{settings.web_host}:{settings.web_port}",  # what other workers call for views
        web_application_options={"middlewares": [json_errors]},  # every error answer JSON, none a traceback
        web_tables_enabled=False,
        web_router_enabled=False,  # Faust's /router pages route JSON-encoded keys (faust #514); ours route raw ones
        web_graph_enabled=False,
        web_stats_enabled=False,
        topic_allow_declare=False,  # topics come from `cdp topics`, with our partition counts
        topic_disable_leader=True,  # no leader-only timers yet: no __assignor-__leader topic
    )


def build(settings: Settings) -> Graph:
    """Wire every worker stage into a new Faust app."""
    json_protocol_errors()
    app = create_app(settings)
    codecs = Codecs(settings)
    producer = _LazyProducer(settings)
    dedup = DedupStage(
        accepted_topic=EVENTS_ACCEPTED.name(settings),
        raw_topic=EVENTS_RAW.name(settings),
        dead_letter_topic=EVENTS_DEAD_LETTER.name(settings),
        codec=codecs.for_topic(EVENTS_ACCEPTED),
        dead_letter_codec=codecs.for_topic(EVENTS_DEAD_LETTER),
        window_ms=settings.ingest.dedup_window_ms,
        store_dir=worker_data_dir(settings) / "dedup",
        bootstrap=settings.kafka_bootstrap,
        producer=producer,
    )
    identity = _identity_stage(app, settings, codecs, producer)
    definitions = DefinitionsFeed(
        bootstrap=settings.kafka_bootstrap, topic=DEFINITIONS.name(settings), codec=codecs.for_topic(DEFINITIONS),
        traits=settings.traits, audiences=settings.audiences, destinations=settings.destinations,
    )  # fmt: skip
    compute = _compute_stage(app, settings, codecs, producer, definitions)
    feeds = {
        stage: InputFeed(stage.name, settings.kafka_bootstrap, pipeline_group(settings), inputs)
        for stage, inputs in ((dedup, [dedup.accepted_topic]), (identity, [identity.topics.raw, identity.topics.commands]),
                              (compute, [compute.topics.resolved, compute.topics.merges, compute.topics.commands]))
    }  # fmt: skip
    _read_beneath_faust(app, feeds)
    owners = app.assignor.external_topics_metadata
    compute_views = ComputeViews(
        Router(compute, compute.topics.resolved, EVENTS_RESOLVED.partition_count(settings), owners),
        lambda: definitions.live, compute.now,
    )  # fmt: skip
    views = IdentityViews(Router(identity, identity.topics.commands, IDENTITY_COMMANDS.partition_count(settings), owners),
                          compute_views.enrich)  # fmt: skip

    def partitions(tps: Any, topic: str) -> set[int]:
        return {tp.partition for tp in tps if tp.topic == topic}

    @app.on_partitions_revoked.connect
    async def _stop_writing_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        for feed in feeds.values():  # first: no batch of these is read or taken from now on
            await feed.revoke(partitions(revoked, feed.topics[0]))
        dedup.on_partitions_revoked(partitions(revoked, dedup.accepted_topic))
        await identity.on_partitions_revoked(partitions(revoked, identity.topics.commands))
        await compute.on_partitions_revoked(partitions(revoked, compute.topics.resolved))

    @app.on_partitions_assigned.connect
    async def _catch_up_on_assignment(sender: Any, assigned: Any, **kwargs: Any) -> None:
        dedup.on_partitions_assigned(partitions(assigned, dedup.accepted_topic))
        identity.on_partitions_assigned(partitions(assigned, identity.topics.commands))
        compute.on_partitions_assigned(partitions(assigned, compute.topics.resolved))
        for feed in feeds.values():
            await feed.assign(partitions(assigned, feed.topics[0]))

    @app.timer(interval=COMMIT_INTERVAL_S)
    async def _commit_inputs() -> None:
        await commit_offsets(app, list(feeds.values()))  # never raises, like every timer body here

    @app.task
    async def _follow_definitions() -> None:
        definitions.start()
        freeze_start_up()  # the app, its schemas and definitions are built: the collector need not scan them again

    @app.timer(interval=TICK_S)
    async def _slide_windows() -> None:
        await compute.tick()  # never raises: an exception escaping a timer would kill the worker

    @app.timer(interval=MEMO_SWEEP_S)
    async def _expire_memos() -> None:
        await identity.expire_memos(int(time.time() * 1000))  # never raise, like every timer body here
        await compute.expire_memos(compute.now())

    def identity_applied(tp: Any) -> int | None:
        return identity.applied_offset(tp.partition, tp.topic)

    def compute_applied(tp: Any) -> int | None:
        return compute.applied_offset(tp.partition, tp.topic)

    def metrics() -> list[Metric]:
        counters = dedup.counters
        events = Metric("cdp_dedup_events_total", "counter", "dedup stage decisions")
        events.add(counters.passed, outcome="passed").add(counters.duplicates, outcome="duplicate")
        events.add(counters.dead_lettered, outcome="dead_lettered")
        lag = Metric("cdp_consumer_lag", "gauge", "input records not yet decided, per assigned partition")
        applied_by = {dedup: lambda tp: dedup.applied_offset(tp.partition), identity: identity_applied, compute: compute_applied}
        for stage, feed in feeds.items():
            for tp in sorted(TP(topic, partition) for topic in feed.topics for partition in feed.owned()):
                applied, highwater = applied_by[stage](tp), feed.highwater(tp.topic, tp.partition)
                if applied is not None and highwater is not None:
                    lag.add(max(highwater - applied, 0), stage=stage.name, topic=tp.topic, partition=str(tp.partition))
        caught_up = Metric("cdp_dedup_caught_up_total", "counter", "sightings read back from the raw topic")
        ident = Metric("cdp_identity_total", "counter", "identity stage work, by what was done")
        for name, count in vars(identity.counters).items():
            ident.add(count, what=name)
        comp = Metric("cdp_compute_total", "counter", "compute stage work, by what was done")
        for name, count in vars(compute.counters).items():
            comp.add(count, what=name)
        skipped = Metric("cdp_definitions_skipped_total", "counter", "records of the definitions topic that were not definitions")
        memos = Metric("cdp_memos_expired_total", "counter", "per-event memo keys deleted past the memo horizon")
        memos.add(identity.memos_expired, stage="identity").add(compute.memos_expired, stage="compute")
        return [events, lag, caught_up.add(counters.caught_up), ident, comp, skipped.add(definitions.skipped), memos,
                *blocked_metrics([dedup.health, identity.health, compute.health]), stage_cpu(), gc_seconds(), process_cpu()]  # fmt: skip

    worker_web.register(
        app, settings=settings, views=views, compute_views=compute_views, definitions=definitions, producer=producer,
        partitions=EVENTS_RESOLVED.partition_count(settings), metrics=metrics,
        stages=[stage.name for stage in STAGES if "worker" in stage.runs_in],
    )  # fmt: skip

    @app.task
    async def _stop_in_time() -> None:
        watch_shutdown(lambda: bool(app.should_stop), lambda: _blocked_summary([dedup.health, identity.health, compute.health]))

    return Graph(app=app, dedup=dedup, identity=identity, compute=compute, definitions=definitions)


def _read_beneath_faust(app: faust.App, feeds: dict[Any, InputFeed]) -> None:
    """Each stage reads its inputs through its own InputFeed, in a task of the app. Faust's consumer stays
    subscribed to them (its group assigns them, co-partitioned by count, and routes the views) but never fetches
    them (topology/input_feed.py says why)."""
    topics = [topic for feed in feeds.values() for topic in feed.topics]
    for feed in feeds.values():
        aiter(app.topic(*feed.topics, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"))  # subscribes
    never_fetch(app.consumer, topics)
    for stage, feed in feeds.items():
        app.task(_reader(app, stage, feed))


def _reader(app: faust.App, stage: Any, feed: InputFeed) -> Callable[[], Awaitable[None]]:
    async def read() -> None:
        try:
            await stage.run(feed)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug: a worker that no longer reads must not look alive
            log.exception("%s: reading its inputs failed; stopping the worker", stage.name)
            await app.crash(exc)
        finally:
            await feed.close()

    read.__name__ = f"read_{stage.name}"
    return read


def _identity_stage(app: faust.App, settings: Settings, codecs: Codecs, producer: _LazyProducer) -> IdentityStage:
    """The identity agent: one stream over events.raw and identity.commands (co-partitioned, one store each)."""
    topics = IdentityTopics(
        raw=EVENTS_RAW.name(settings), commands=IDENTITY_COMMANDS.name(settings), state=IDENTITY_STATE.name(settings),
        resolved=EVENTS_RESOLVED.name(settings), merges=IDENTITY_MERGES.name(settings),
        dead_letter=EVENTS_DEAD_LETTER.name(settings),
    )  # fmt: skip
    stage = IdentityStage(
        topics=topics,
        codecs=IdentityCodecs(
            raw=codecs.for_topic(EVENTS_RAW), command=codecs.for_topic(IDENTITY_COMMANDS), state=codecs.for_topic(IDENTITY_STATE),
            resolved=codecs.for_topic(EVENTS_RESOLVED), merges=codecs.for_topic(IDENTITY_MERGES),
            dead_letter=codecs.for_topic(EVENTS_DEAD_LETTER),
        ),  # fmt: skip
        protocol=IdentityProtocol(settings.identity, max_record_bytes=MAX_RECORD_BYTES),
        partitions=IDENTITY_COMMANDS.partition_count(settings),
        store_dir=worker_data_dir(settings) / "identity",
        memo_horizon_ms=settings.topics.memo_horizon,
        bootstrap=settings.kafka_bootstrap,
        producer=producer,
    )
    return stage


def _compute_stage(app: faust.App, settings: Settings, codecs: Codecs, producer: _LazyProducer,
                   definitions: DefinitionsFeed) -> ComputeStage:  # fmt: skip
    """The compute agent: one stream over events.resolved, identity.merges and compute.commands (co-partitioned)."""
    topics = ComputeTopics(
        resolved=EVENTS_RESOLVED.name(settings), merges=IDENTITY_MERGES.name(settings),
        commands=COMPUTE_COMMANDS.name(settings), state=COMPUTE_STATE.name(settings),
        changes=PROFILE_CHANGES.name(settings), membership=AUDIENCE_MEMBERSHIP.name(settings),
        dead_letter=EVENTS_DEAD_LETTER.name(settings),
    )  # fmt: skip
    stage = ComputeStage(
        topics=topics,
        codecs=ComputeCodecs(
            resolved=codecs.for_topic(EVENTS_RESOLVED), merges=codecs.for_topic(IDENTITY_MERGES),
            command=codecs.for_topic(COMPUTE_COMMANDS), state=codecs.for_topic(COMPUTE_STATE),
            changes=codecs.for_topic(PROFILE_CHANGES), membership=codecs.for_topic(AUDIENCE_MEMBERSHIP),
            dead_letter=codecs.for_topic(EVENTS_DEAD_LETTER),
        ),  # fmt: skip
        live=lambda: definitions.live,
        live_ready=definitions.caught_up.is_set,
        definitions_exist=definitions.exists,
        partitions=EVENTS_RESOLVED.partition_count(settings),
        store_dir=worker_data_dir(settings) / "compute",
        memo_horizon_ms=settings.topics.memo_horizon,
        bootstrap=settings.kafka_bootstrap,
        producer=producer,
    )
    return stage


class _LazyProducer:
    """The worker's confluent-kafka producer, created on first use: importing the app must not connect."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._producer: AsyncProducer | None = None

    def __call__(self) -> AsyncProducer:
        if self._producer is None:
            config = producer_config(self._settings.kafka_bootstrap, self._settings.ingest.delivery_timeout_ms)
            self._producer = AsyncProducer(config)
        return self._producer


def ingest_server(settings: Settings, producer: AsyncProducer) -> IngestServer:
    """The HTTP ingest of this settings' pipeline, writing through `producer`, pushing back on the workers' lag
    (its `lag` reads Kafka once started; `ingest.max_lag` 0: never started, never refuses)."""
    server = IngestServer(
        sources=settings.source_by_write_key(),
        topic=EVENTS_ACCEPTED.name(settings),
        codec=Codecs(settings).for_topic(EVENTS_ACCEPTED),
        producer=producer,
        max_in_flight=settings.ingest.max_in_flight,
        retry_after_s=settings.ingest.retry_after_s,
        request_timeout_s=settings.ingest.delivery_timeout_ms / 1000 + 1,
    )
    server.lag = PipelineLag(settings.ingest.max_lag, KafkaLagReader(settings), lambda: server.events_accepted, lambda: server.in_flight)
    return server


def describe(settings: Settings) -> str:
    """The graph as text: stages with their edges, then every topic with key, schema and partitions."""
    lines = ["Stages:"]
    for stage in STAGES:
        lines.append(f"  {stage.name}  [{stage.runs_in}]")
        lines.append(f"    {stage.doc}")
        lines.extend(f"    reads   {_named(source, settings)}" for source in stage.reads)
        lines.extend(f"    writes  {spec.name(settings)}" for spec in stage.writes)
        lines.extend(f"    state   {state}" for state in stage.state)
    wired = {spec for stage in STAGES for spec in (*stage.reads, *stage.writes) if isinstance(spec, TopicSpec)}
    lines.append("Topics:")
    for spec in ALL_TOPICS:
        shape = "compacted" if spec.compacted else "delete"
        note = "" if spec in wired else "  (declared; its stage is not built yet)"
        lines.append(
            f"  {spec.name(settings):32} key={spec.key:22} value={spec.schema:28} "
            f"partitions={spec.partition_count(settings)} {shape}{note}"
        )
    return "\n".join(lines)


def _blocked_summary(healths: list[PartitionHealth]) -> str:
    blocked = [f"{h.stage}[{p}] {b.state} ({b.reason})" for h in healths for p, b in sorted(h.blocked.items())]
    return ", ".join(blocked) or "no partition stalled"


def _named(source: TopicSpec | str, settings: Settings) -> str:
    return source.name(settings) if isinstance(source, TopicSpec) else source
