"""`cdp bench pipeline`: every configuration's throughput beside its floor, then latency and flood; JSON and a
table (docs/benchmarks.md)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import bench_pipeline, write_report
from bench.pipeline import throughput
from bench.pipeline_load import flood, latency
from topology.config import Settings


def run_pipeline_bench(settings: Settings, *, events: int, configurations: Sequence[str], worker_counts: Sequence[int],
                       latency_seconds: float, out: Path | None, flood_seconds: float = 0) -> str:  # fmt: skip
    started = time.perf_counter()
    with bench_pipeline(settings) as probe:
        header = probe.header("pipeline")
    runs = []
    for name in configurations:
        for count in worker_counts:
            if count == 1 or name == "example":
                runs.append(throughput(settings, name, count, events))
    report: dict[str, Any] = {**header, "events": events, "runs": runs}
    one = next((r for r in runs if r["configuration"] == "example" and r["workers"] == 1), None)
    if latency_seconds and one is not None:
        report["latency"] = latency(settings, round(one["events_per_s"] / 2, -1), latency_seconds)
    if flood_seconds:
        report["flood"] = flood(settings, flood_seconds)
    report["total_seconds"] = round(time.perf_counter() - started)
    table = render_table(report)
    print(table, file=sys.stderr)
    report["table"] = table.splitlines()
    return write_report(report, out)


def render_table(report: dict[str, Any]) -> str:
    lines = ["| configuration | workers | events/s | × floor | worker µs/event | broker µs/event | records/event | KB/event |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in report["runs"]:
        floor_run = run.get("floor")
        lines.append(f"| {run['configuration']} ({run['definitions']} definitions) | {run['workers']} | {run['events_per_s']:,} | "
                     f"{run.get('ratio_to_floor', '–')} | {run['worker_cpu_us_per_event']} | {run['broker_cpu_us_per_event']} | "
                     f"{run['records_per_event']} | {run['kb_per_event']} |")  # fmt: skip
        if floor_run:
            lines.append(f"| floor (same input) | 1 | {floor_run['events_per_s']:,} | 1 | {floor_run['cpu_us_per_event']} | "
                         f"{floor_run['broker_cpu_us_per_event']} | 4 (input + 3 hops) | – |")  # fmt: skip
    if report.get("latency"):
        lat = report["latency"]
        lines.append(f"\nlatency at {lat['offered_events_per_s']}/s: {lat['latency_ms']}")
    if report.get("flood"):
        f = report["flood"]
        lines.append(f"\nflood {f['seconds']} s: accepted {f['accepted']:,}, applied {f['applied_after_drain']:,} (lost {f['lost']}), "
                     f"max lag read {f['max_lag_read']:,.0f}, max backlog (accepted - applied) {f.get('max_backlog', 0):,} "
                     f"(bound {f['max_lag_bound']:,}), seconds applying ≥ 80 % of accepted "
                     f"or answering 429: {f['seconds_applied_80pct_or_429']}/{f['seconds']}")  # fmt: skip
    return "\n".join(lines)
