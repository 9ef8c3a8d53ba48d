"""The whole pipeline in one place: which stage reads which topic, writes which, keyed by what, with what state.

Read this file first. `STAGES` is the graph as data (what `cdp topology` prints), each worker stage's spec declared
by its module in topology/stages/; `build()` wires every worker stage alike (the stage contract,
topology/runtime/stage.py) into a Faust app, and `ingest_server()` builds the HTTP ingest. Only stages that work are
wired; the other topics of the product are declared in topology/topics.py and created by `cdp topics`.

    HTTP /v1/* ──▶ ingest ──▶ cdp.events.accepted ──▶ dedup ──▶ cdp.events.raw ──▶ identity ──▶ cdp.events.resolved ─┐
                                                         └──▶ cdp.events.dead-letter     │  ▲   └──▶ cdp.identity.merges ──┤
                                                                 cdp.identity.commands ──┘  │        (state: cdp.identity.state)
                                                                                └───────────┘                             ▼
          cdp.definitions (compacted; every worker follows it) ──▶ compute ◀──▶ cdp.compute.commands   (state: cdp.compute.state)
                                                                     └──▶ cdp.profile.changes, cdp.audience.membership ─┐
                                                                                                                        ▼
          cdp.definitions (destinations) ──▶ sync (a courier per destination) ──▶ webhooks   (state: cdp.sync.state)
                                               └──▶ cdp.sync.outcomes, cdp.sync.dead-letter
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import faust

from topology.app import create_app
from topology.codecs import Codecs
from topology.config import Settings
from topology.runtime.definitions_feed import DefinitionsFeed
from topology.runtime.gc_tuning import freeze_start_up, gc_seconds
from topology.runtime.input_feed import InputFeed, commit_offsets, faust_group_metadata, never_fetch
from topology.runtime.pipeline_lag import KafkaLagReader, PipelineLag, pipeline_group
from topology.runtime.producer import AsyncProducer, LazyProducer
from topology.runtime.shutdown import watch_shutdown
from topology.runtime.stage import Stage
from topology.runtime.stage_cpu import stage_cpu
from topology.runtime.stalls import PartitionHealth, blocked_metrics
from topology.spec import StageSpec, Wiring
from topology.stages import compute, dedup, identity, sync
from topology.stages.compute import ComputeStage
from topology.stages.dedup import DedupStage
from topology.stages.identity import IdentityStage
from topology.stages.sync import SyncStage
from topology.topics import ALL_TOPICS, DEFINITIONS, EVENTS_ACCEPTED, EVENTS_RESOLVED, IDENTITY_COMMANDS, PROFILE_CHANGES, TopicSpec
from topology.web import worker as worker_web
from topology.web.common import json_protocol_errors
from topology.web.compute_views import ComputeViews
from topology.web.identity_views import IdentityViews
from topology.web.ingest import IngestServer
from topology.web.metrics import Metric, merged, process_cpu
from topology.web.routing import Router
from topology.web.sync_views import SyncViews

log = logging.getLogger(__name__)
COMMIT_INTERVAL_S = 0.2  # input offsets committed to the group: what a crash re-reads at most, what the lag counts twice

INGEST = StageSpec(
    "ingest", "cdp ingest (HTTP, stateless; run N)", ("HTTP POST /v1/{track,identify,page,screen,group,alias,batch,import}",),
    (EVENTS_ACCEPTED,), (),
    "validates Segment calls, answers 200 after Kafka acks=all; key messageId",
)  # fmt: skip
WORKER_STAGES = (dedup, identity, compute, sync)  # modules with SPEC and wire(Wiring), in pipeline order
STAGES: tuple[StageSpec, ...] = (INGEST, *(module.SPEC for module in WORKER_STAGES))


def copartitioned_pairs() -> tuple[tuple[TopicSpec, TopicSpec], ...]:
    """Every topic a stage co-partitions, paired with the stage's first: what `cdp worker` checks at start."""
    return tuple((stage.copartitioned[0], other) for stage in STAGES for other in stage.copartitioned[1:])


@dataclass
class Graph:
    """A wired worker: the Faust app and the stage objects behind it (for metrics and tests)."""

    app: faust.App
    dedup: DedupStage
    identity: IdentityStage
    compute: ComputeStage
    sync: SyncStage
    definitions: DefinitionsFeed


def build(settings: Settings) -> Graph:
    """Wire every worker stage into a new Faust app."""
    json_protocol_errors()
    app = create_app(settings)
    codecs = Codecs(settings)
    producer = LazyProducer(settings)
    definitions = DefinitionsFeed(
        bootstrap=settings.kafka_bootstrap, topic=DEFINITIONS.name(settings), codec=codecs.for_topic(DEFINITIONS),
        traits=settings.traits, audiences=settings.audiences, destinations=settings.destinations,
    )  # fmt: skip
    wiring = Wiring(settings, codecs, producer, definitions)
    stages: list[Stage] = [module.wire(wiring) for module in WORKER_STAGES]
    feeds = {stage.name: InputFeed(stage.name, settings.kafka_bootstrap, pipeline_group(settings), stage.inputs(),
                                   group_metadata=lambda: faust_group_metadata(app)) for stage in stages}  # fmt: skip
    _read_beneath_faust(app, stages, feeds)

    def partitions(tps: Any, topic: str) -> set[int]:
        return {tp.partition for tp in tps if tp.topic == topic}

    @app.on_partitions_revoked.connect
    async def _stop_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        for feed in feeds.values():  # first: no batch of these is read or taken from now on
            await feed.revoke(partitions(revoked, feed.topics[0]))
        for stage in stages:
            await stage.on_partitions_revoked(partitions(revoked, stage.inputs()[0]))

    @app.on_partitions_assigned.connect
    async def _start_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
        for stage in stages:
            stage.on_partitions_assigned(partitions(assigned, stage.inputs()[0]))
        for feed in feeds.values():
            await feed.assign(partitions(assigned, feed.topics[0]))

    @app.timer(interval=COMMIT_INTERVAL_S)
    async def _commit_inputs() -> None:
        await commit_offsets(app, list(feeds.values()))  # never raises, like every timer body here

    @app.task
    async def _follow_definitions() -> None:
        definitions.start()
        freeze_start_up()  # the app, its schemas and definitions are built: the collector need not scan them again

    for stage in stages:
        for interval, body in stage.timers():
            app.timer(interval=interval, name=f"{stage.name}.{body.__name__}")(body)

    graph = Graph(app, *stages, definitions=definitions)  # type: ignore[arg-type]  (WORKER_STAGES' order)
    healths = [stage.health for stage in stages]

    def metrics() -> list[Metric]:
        lag = Metric("cdp_consumer_lag", "gauge", "input records not yet decided, per assigned partition")
        for stage in stages:
            feed = feeds[stage.name]
            for topic in feed.topics:
                for partition in sorted(feed.owned()):
                    applied, highwater = stage.applied_offset(partition, topic), feed.highwater(topic, partition)
                    if applied is not None and highwater is not None:
                        lag.add(max(highwater - applied, 0), stage=stage.name, topic=topic, partition=str(partition))
        skipped = Metric("cdp_definitions_skipped_total", "counter", "records of the definitions topic that were not definitions")
        return merged([lag, *(metric for stage in stages for metric in stage.metrics()), skipped.add(definitions.skipped),
                       *blocked_metrics(healths), stage_cpu(), *gc_seconds(), process_cpu()])  # fmt: skip

    _serve(app, settings, graph, producer, metrics)

    @app.task
    async def _stop_in_time() -> None:
        watch_shutdown(lambda: bool(app.should_stop), lambda: _blocked_summary(healths))

    return graph


def _serve(app: faust.App, settings: Settings, graph: Graph, producer: LazyProducer, metrics: Callable[[], list[Metric]]) -> None:
    """The worker's HTTP routes: views routed to the owners of a key's partition, definitions, health, metrics."""
    owners = app.assignor.external_topics_metadata  # type: ignore[attr-defined]
    compute_, identity_, definitions = graph.compute, graph.identity, graph.definitions
    compute_views = ComputeViews(
        Router(compute_, compute_.topics.resolved, EVENTS_RESOLVED.partition_count(settings), owners),
        lambda: definitions.live, compute_.now,
    )  # fmt: skip
    views = IdentityViews(Router(identity_, identity_.topics.commands, IDENTITY_COMMANDS.partition_count(settings), owners),
                          compute_views.enrich)  # fmt: skip
    sync_ = graph.sync
    sync_views = SyncViews(Router(sync_, sync_.topics.changes, PROFILE_CHANGES.partition_count(settings), owners), sync_.status)
    worker_web.register(
        app, settings=settings, views=views, compute_views=compute_views, definitions=definitions, producer=producer,
        partitions=EVENTS_RESOLVED.partition_count(settings), metrics=metrics,
        stages=[module.SPEC.name for module in WORKER_STAGES], sync_views=sync_views,
    )  # fmt: skip


def _read_beneath_faust(app: faust.App, stages: list[Stage], feeds: dict[str, InputFeed]) -> None:
    """Each stage reads its inputs through its own InputFeed, in a task of the app. Faust's consumer stays
    subscribed to them (its group assigns them, co-partitioned by count, and routes the views) but never fetches
    them (topology/runtime/input_feed.py says why)."""
    topics = [topic for feed in feeds.values() for topic in feed.topics]
    for feed in feeds.values():
        aiter(app.topic(*feed.topics, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"))  # subscribes
    never_fetch(app.consumer, topics)
    for stage in stages:
        app.task(_reader(app, stage, feeds[stage.name]))


def _reader(app: faust.App, stage: Stage, feed: InputFeed) -> Callable[[], Awaitable[None]]:
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
