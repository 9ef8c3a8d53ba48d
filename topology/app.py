"""The Faust app and its settings (docs/design.md says why for each).

Faust is the application — group membership, co-partitioned assignment, rebalance signals, timers, the web
server — while the stages read their inputs beneath it (topology/runtime/input_feed.py). `faust -A topology.app
worker` runs the app wired from the environment; `cdp worker` does the same with its own options, and tests build
apps from explicit Settings with `topology.graph.build`.
"""

from __future__ import annotations

from typing import Any

import faust

from topology.config import Settings
from topology.runtime.pipeline_lag import pipeline_group
from topology.spec import worker_data_dir
from topology.web.common import json_errors


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


def __getattr__(name: str) -> Any:
    """`topology.app.app`, for `faust -A topology.app`: built on first use, so importing the module wires nothing."""
    if name != "app":
        raise AttributeError(name)
    from topology.graph import build

    built = globals()["app"] = build(Settings.from_env()).app  # once: later lookups find the module attribute
    return built
