"""`cdp topics`, `cdp topology` and `cdp kafka status` as a user runs them: real processes, real broker."""

from __future__ import annotations

import subprocess
import sys

from confluent_kafka.admin import AdminClient, NewTopic

from tests.support import REPO_ROOT, Pipeline
from topology.topics import ALL_TOPICS


def cdp(pipeline: Pipeline, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "topology.ops.cli", *args], env=pipeline.env(**env), cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_topics_creates_what_is_missing_then_verifies_and_reports_mismatches(kafka_bootstrap: str, tmp_path) -> None:
    pipe = Pipeline(bootstrap=kafka_bootstrap, root=tmp_path, partitions=3)
    first = cdp(pipe, "topics")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("created") == len(ALL_TOPICS)
    topics = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics
    assert len(topics[pipe.topic("events.raw")].partitions) == 3
    assert len(topics[pipe.topic("definitions")].partitions) == 1
    again = cdp(pipe, "topics")
    assert again.returncode == 0 and again.stdout.count("ok") == len(ALL_TOPICS)

    wrong = Pipeline(bootstrap=kafka_bootstrap, root=tmp_path / "wrong", partitions=2)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(wrong.topic("events.raw"), 5, 1)])[wrong.topic("events.raw")].result()
    mismatch = cdp(wrong, "topics")
    assert mismatch.returncode == 1
    assert f"mismatch  {wrong.topic('events.raw')} (5 partitions) has 5 partitions, the config says 2" in mismatch.stdout
    worker = cdp(wrong, "worker")
    assert worker.returncode == 2 and "has 2 partitions but" in worker.stderr and "must match" in worker.stderr
    missing = cdp(Pipeline(bootstrap=kafka_bootstrap, root=tmp_path / "none"), "worker")
    assert missing.returncode == 2 and "run `cdp topics` first" in missing.stderr


def test_topology_prints_every_stage_and_topic_with_key_and_schema(kafka_bootstrap: str, tmp_path) -> None:
    pipe = Pipeline(bootstrap=kafka_bootstrap, root=tmp_path)
    out = cdp(pipe, "topology").stdout
    for spec in ALL_TOPICS:
        line = next(line for line in out.splitlines() if line.strip().startswith(pipe.topic(spec.suffix) + " "))
        assert f"value={spec.schema}" in line and "key=" in line
    assert "dedup" in out and f"writes  {pipe.topic('events.raw')}" in out


def test_kafka_status_and_errors_are_one_clear_line(kafka_bootstrap: str, tmp_path) -> None:
    pipe = Pipeline(bootstrap=kafka_bootstrap, root=tmp_path)
    status = cdp(pipe, "kafka", "status", CDP_KAFKA_BOOTSTRAP="127.0.0.1:1")
    assert status.returncode == 1 and "not running" in status.stdout
    remote = cdp(pipe, "kafka", "start", CDP_KAFKA_BOOTSTRAP="kafka.example.com:9092")
    assert remote.returncode == 2 and "not a local address" in remote.stderr and "Traceback" not in remote.stderr


def test_faust_cli_runs_the_same_app(pipeline: Pipeline) -> None:
    """`faust -A topology.app worker` keeps working: it runs the wired dedup agent like `cdp worker`."""
    import uuid

    from tests.support import healthy, wait_until

    faust = subprocess.Popen(
        [sys.executable, "-m", "faust", "-A", "topology.app", "worker", "-l", "warn", "--web-port", str(pipeline.web_port)],
        env=pipeline.env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    pipeline.processes.append(faust)
    pipeline.start("ingest")
    wait_until(lambda: healthy(pipeline.web_port) or faust.poll() is not None, timeout=90, what="faust worker /health")
    assert faust.poll() is None
    message_id = f"faust-cli-{uuid.uuid4().hex[:8]}"
    assert pipeline.post("/v1/track", {"userId": "u", "event": "e", "messageId": message_id}).status_code == 200
    records = pipeline.read("events.raw", until=lambda rs: any(r.key.decode() == message_id for r in rs), decode=False)
    assert [r.key.decode() for r in records] == [message_id]
