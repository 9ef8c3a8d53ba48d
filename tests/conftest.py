"""Session fixtures: one real Kafka broker for the whole run (or the cluster CDP_KAFKA_BOOTSTRAP names), and one real
Postgres server for the tests that ask for it (topology/ops/postgres_local.py).

The broker comes from topology.ops.kafka_local, the same code as `cdp kafka start`, with its jars cached in
.cache/kafka-runtime (fetched from Maven Central once per checkout) and its data in a temp dir.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from topology.ops.postgres_local import PostgresServer
from tests.support import REPO_ROOT, Pipeline, free_ports
from topology.config import Settings


def runtime_dir() -> Path:
    """CDP_KAFKA_RUNTIME_DIR if set, else .cache/kafka-runtime: the jars are fetched once per checkout."""
    return Settings.from_env({"CDP_DATA_DIR": str(REPO_ROOT / ".cache"), **os.environ}).kafka_runtime_dir


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from topology.ops.kafka_local import LocalKafka, is_reachable

    external = os.environ.get("CDP_KAFKA_BOOTSTRAP")
    if external:
        if not is_reachable(external, timeout=10):
            pytest.fail(f"CDP_KAFKA_BOOTSTRAP={external} is set but no Kafka answers there")
        yield external
        return
    port, controller_port = free_ports(2)
    broker = LocalKafka(data_dir=tmp_path_factory.mktemp("kafka"), runtime_dir=runtime_dir(), port=port, controller_port=controller_port)
    started = broker.start()
    print(f"\nkafka: local broker {started.bootstrap} up in {started.seconds:.1f}s")
    try:
        yield started.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def pipeline(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Pipeline]:
    """An isolated pipeline (own topic prefix) with its topics created; processes started by the test."""
    pipe = Pipeline(bootstrap=kafka_bootstrap, root=tmp_path)
    pipe.create_topics()
    try:
        yield pipe
    finally:
        pipe.stop_all()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """Debian's Postgres in a temp dir on its own port, for the whole run (each test uses its own schema)."""
    server = PostgresServer().start()
    print(f"\npostgres: {server.bin.parent.name} on port {server.port}")
    try:
        yield server
    finally:
        server.stop()
