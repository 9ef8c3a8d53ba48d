"""`cdp`: the command line of the pipeline (entry point in pyproject.toml).

Every command reads Settings from the environment (`CDP_*`, `CDP_CONFIG`) and fails with one clear line
(a ConfigError's message) rather than a traceback when the setup can't work.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from agents.errors import CdpError, ConfigError
from topology.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO_ROOT / "cdp.example.yaml"


def local_kafka(settings: Settings):  # -> LocalKafka; imported lazily, most commands don't need Java
    """The embedded broker for `settings.kafka_bootstrap`, which must then be a local address."""
    from topology.ops.kafka_local import LocalKafka

    host, _, port = settings.kafka_bootstrap.split(",")[0].rpartition(":")
    if host not in ("localhost", "127.0.0.1", "") or not port.isdigit():
        raise ConfigError(
            f"CDP_KAFKA_BOOTSTRAP={settings.kafka_bootstrap} is not a local address; "
            "`cdp kafka` manages only a broker on this machine (localhost:PORT)"
        )
    return LocalKafka(
        data_dir=settings.data_dir / "kafka", runtime_dir=settings.kafka_runtime_dir, port=int(port), controller_port=int(port) + 1
    )


def cmd_kafka(settings: Settings, args: argparse.Namespace) -> int:
    kafka = local_kafka(settings)
    if args.action == "start":
        started = kafka.start()
        verb = "already running" if started.already_running else f"started in {started.seconds:.1f}s"
        print(f"kafka {verb}: bootstrap {started.bootstrap} (pid {started.pid}, data {kafka.data_dir})")
    elif args.action == "stop":
        print("kafka stopped" if kafka.stop() else "kafka was not running")
    else:
        status = kafka.status()
        rss = f", rss {status.rss_bytes / 2**20:.0f} MiB" if status.rss_bytes else ""
        state = "running" if status.running else "not running"
        print(f"kafka {state} (pid {status.pid}), {status.bootstrap} {'reachable' if status.reachable else 'unreachable'}{rss}")
        return 0 if status.running and status.reachable else 1
    return 0


def cmd_topics(settings: Settings, args: argparse.Namespace) -> int:
    from topology.ops.admin import ensure_topics

    reports = ensure_topics(settings)
    for report in reports:
        print(f"{report.status:9} {report.name} ({report.partitions} partitions) {report.detail}".rstrip())
    return 1 if any(report.status == "mismatch" for report in reports) else 0


def cmd_topology(settings: Settings, args: argparse.Namespace) -> int:
    from topology.graph import describe

    print(describe(settings))
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    import faust

    from topology.runtime import gc_tuning
    from topology.graph import build

    if args.web_port is not None:
        settings = replace(settings, web_port=args.web_port)
    from topology.ops.admin import check_copartitioned
    from topology.graph import copartitioned_pairs

    check_copartitioned(settings, copartitioned_pairs())  # the stage specs say which topics meet per partition
    _use_uvloop()
    gc_tuning.tune()
    graph = build(settings)
    worker = faust.Worker(graph.app, loglevel=args.loglevel)
    worker.execute_from_commandline()  # returns only by exiting the process
    return 0


def _use_uvloop() -> None:
    """uvloop halves asyncio's own per-task and per-callback cost, which Faust pays per message."""
    try:
        import uvloop
    except ImportError:  # a speed-up, not a requirement
        return
    import asyncio

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    from topology.ops.ingest_main import serve

    if args.port is not None:
        settings = replace(settings, ingest_port=args.port)
    serve(settings)
    return 0


def cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    """Everything on the embedded default, in one process group: local Kafka, topics, a worker, the ingest."""
    from topology.ops.admin import ensure_topics
    from topology.ops.kafka_local import is_reachable

    env = dict(os.environ)
    if settings.config_path is None:
        settings = Settings.from_env({**os.environ, "CDP_CONFIG": str(EXAMPLE_CONFIG)})
        env["CDP_CONFIG"] = str(EXAMPLE_CONFIG)
    if not is_reachable(settings.kafka_bootstrap):
        started = local_kafka(settings).start()
        print(f"kafka: local broker on {started.bootstrap} ({started.seconds:.1f}s; `cdp kafka stop` stops it)")
    else:
        print(f"kafka: using {settings.kafka_bootstrap}")
    for report in ensure_topics(settings):
        if report.status != "ok":
            print(f"topics: {report.status} {report.name} {report.detail}")
    children = [
        subprocess.Popen([sys.executable, "-m", "topology.ops.cli", "worker"], env=env),
        subprocess.Popen([sys.executable, "-m", "topology.ops.cli", "ingest"], env=env),
    ]
    key = next(iter(settings.source_by_write_key()), "<a write key from your config>")
    print(
        f"ingest: http://localhost:{settings.ingest_port}  worker web: http://localhost:{settings.web_port}\n"
        f"try:    curl -u {key}: -d '{{\"userId\":\"u1\",\"event\":\"Signed Up\"}}' "
        f"http://localhost:{settings.ingest_port}/v1/track\nCtrl-C stops the worker and the ingest."
    )
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
    return max((child.returncode or 0) for child in children) if any(c.returncode for c in children) else 0


def cmd_generate(settings: Settings, args: argparse.Namespace) -> int:
    from bench.load import generate

    key = args.write_key or next(iter(settings.source_by_write_key()), None)
    if key is None:
        raise ConfigError("no write key: pass --write-key or configure sources in CDP_CONFIG")
    url = args.url or f"http://127.0.0.1:{settings.ingest_port}"
    result = generate(url, key, events=args.events, batch_size=args.batch_size, concurrency=args.concurrency, rate=args.rate)
    print(result.summary())
    return 0 if result.failed == 0 else 1


def cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    defaults = {"ingest": 200_000, "dedup": 200_000, "identity": 100_000,  # identity: 6 runs at ~1-2 k events/s (≈ 12 min)
                "compute": 40_000,  # per definition count (10, 50, 200), plus latency and backfill runs
                "pipeline": 60_000,  # per configuration
                "sync": 20_000}  # per mode (single, batched), and the floor's requests
    events = args.events if args.events is not None else defaults[args.stage]
    if args.stage == "pipeline":
        from bench.pipeline_bench import run_pipeline_bench

        print(run_pipeline_bench(settings, events=events, configurations=[c for c in args.configurations.split(",") if c],
                                 worker_counts=[int(w) for w in args.workers.split(",")], latency_seconds=args.latency_seconds,
                                 flood_seconds=args.flood_seconds, out=args.out))  # fmt: skip
    elif args.stage == "sync":
        from bench.sync import run_sync_bench

        print(run_sync_bench(settings, deliveries=events, latency_seconds=args.latency_seconds, out=args.out))
    elif args.stage == "ingest":
        from bench.ingest import run_ingest_bench

        print(run_ingest_bench(settings, events=events, batch_size=args.batch_size, out=args.out))
    elif args.stage == "dedup":
        from bench.dedup import run_dedup_bench

        print(run_dedup_bench(settings, events=events, out=args.out))
    elif args.stage == "identity":
        from bench.identity import run_identity_bench

        print(run_identity_bench(settings, events=events, out=args.out))
    else:
        from bench.compute import run_compute_bench

        print(run_compute_bench(settings, events=events, out=args.out))
    return 0


def cmd_backfill(settings: Settings, args: argparse.Namespace) -> int:
    from topology.ops.backfill import backfill

    print(backfill(settings, args.key, args.kind, args.url))
    return 0


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from topology.ops.replay import parse_time, replay

    print(replay(settings, parse_time(args.from_time), parse_time(args.to_time) if args.to_time else None))
    return 0


def cmd_sync(settings: Settings, args: argparse.Namespace) -> int:
    from topology.ops.redeliver import redeliver
    from topology.ops.replay import parse_time

    summary = redeliver(settings, args.name, parse_time(args.since) if args.since else 0, args.timeout)
    print(summary)
    return 0 if sum(summary.results.values()) == summary.letters else 1


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="cdp", description="A real-time customer data platform on Faust and Kafka.")
    sub = root.add_subparsers(dest="command", required=True)
    sub.add_parser("dev", help="run everything locally: Kafka (started if none is reachable), topics, worker, ingest")
    worker = sub.add_parser("worker", help="a Faust worker (run N of them to scale)")
    worker.add_argument("--web-port", type=int, help="web views port (default CDP_WEB_PORT or 6066)")
    worker.add_argument("--loglevel", default="info")
    ingest = sub.add_parser("ingest", help="the HTTP ingest alone (stateless; run N of them)")
    ingest.add_argument("--port", type=int, help="listen port (default CDP_INGEST_PORT or 8080)")
    kafka = sub.add_parser("kafka", help="the local single-node Kafka broker")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    sub.add_parser("topics", help="create missing topics and verify existing ones")
    sub.add_parser("topology", help="print the graph: stages, topics with key and schema, state")
    generate = sub.add_parser("generate", help="send synthetic Segment events to an ingest")
    generate.add_argument("--url", help="ingest base URL (default http://127.0.0.1:CDP_INGEST_PORT)")
    generate.add_argument("--write-key")
    generate.add_argument("--events", type=int, default=10_000)
    generate.add_argument("--batch-size", type=int, default=100)
    generate.add_argument("--concurrency", type=int, default=8)
    generate.add_argument("--rate", type=float, default=0, help="events/s to aim for (0: as fast as possible)")
    backfill = sub.add_parser("backfill", help="compute a trait or audience again over the history in Kafka")
    backfill.add_argument("key", help="the definition's key")
    backfill.add_argument("--kind", choices=["trait", "audience"], help="needed only when a trait and an audience share the key")
    backfill.add_argument("--url", help="a worker's web URL (default http://127.0.0.1:CDP_WEB_PORT)")
    replay = sub.add_parser("replay", help="re-drive a time range of raw events through identity and compute (idempotent)")
    replay.add_argument("--from", dest="from_time", required=True, help="2026-11-20T10:00:00Z, epoch ms, or a duration ago (2h)")
    replay.add_argument("--to", dest="to_time", help="same forms; default: the end of the topic when the replay starts")
    sync = sub.add_parser("sync", help="destinations: hand dead letters back for delivery")
    sync_sub = sync.add_subparsers(dest="action", required=True)
    redeliver = sync_sub.add_parser("redeliver", help="deliver a destination's dead letters again (superseded ones are skipped)")
    redeliver.add_argument("name", help="the destination")
    redeliver.add_argument("--since", help="only letters failed at or after: an ISO time, epoch ms, or a duration ago (2h)")
    redeliver.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for their outcomes")
    bench = sub.add_parser("bench", help="benchmarks; figures as JSON")
    bench.add_argument("stage", choices=["pipeline", "ingest", "dedup", "identity", "compute", "sync"])
    bench.add_argument("--events", type=int, help="events per run (default 200000; identity 100000; compute 40000)")
    bench.add_argument("--batch-size", type=int, default=100)
    bench.add_argument("--out", type=Path, help="write the JSON report here too")
    bench.add_argument("--configurations", default="example,50,200", help="pipeline: definition sets (example, 50, 200)")
    bench.add_argument("--workers", default="1,2", help="pipeline: worker counts (2 and more run the example config)")
    bench.add_argument("--latency-seconds", type=float, default=20.0, help="pipeline, sync: steady-rate run length, 0 for none")
    bench.add_argument("--flood-seconds", type=float, default=60.0, help="pipeline: HTTP flood run length, 0 for none")
    return root


COMMANDS = {
    "dev": cmd_dev, "worker": cmd_worker, "ingest": cmd_ingest, "kafka": cmd_kafka, "topics": cmd_topics,
    "topology": cmd_topology, "generate": cmd_generate, "bench": cmd_bench, "backfill": cmd_backfill, "replay": cmd_replay,
    "sync": cmd_sync,
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](Settings.from_env(), args)
    except ConfigError as exc:
        print(f"cdp {args.command}: {exc}", file=sys.stderr)
        return 2
    except CdpError as exc:  # Kafka or a worker did not do what was asked: say so, no traceback
        print(f"cdp {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
