"""What a stage is, to the graph: its spec (what a user sees: reads, writes, state, co-partitioning) and what it
needs to be wired (the worker's settings, codecs, producer and definitions).

A stage module in topology/stages/ declares `SPEC` and `wire(Wiring) -> Stage` (topology/runtime/stage.py);
topology/graph.py lists the modules and builds every worker stage the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from topology.codecs import Codecs
from topology.config import Settings
from topology.runtime.definitions_feed import DefinitionsFeed
from topology.runtime.producer import LazyProducer
from topology.topics import TopicSpec


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


@dataclass(frozen=True)
class Wiring:
    """What a worker gives each stage it wires."""

    settings: Settings
    codecs: Codecs
    producer: LazyProducer
    definitions: DefinitionsFeed

    def stage_dir(self, stage: str) -> Path:
        """Where a stage keeps its RocksDB stores: per worker, so two workers on one host share no files."""
        return worker_data_dir(self.settings) / stage


def worker_data_dir(settings: Settings) -> Path:
    """Per worker, so several workers on one host don't share RocksDB files (keyed by the web port)."""
    return settings.data_dir / f"worker-{settings.web_port}"
