"""Prometheus text exposition for /metrics, shared by the worker and the ingest.

Counters only where a rate is what users want (events/s = rate(events_total), CPU-s per million events =
rate(cpu_seconds_total) / rate(events_total) * 1e6); gauges for lag and in-flight work; histograms for latencies
(`histogram_quantile(0.99, rate(..._bucket[5m]))`).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 14400.0)


@dataclass
class Metric:
    """One metric family: name, type, help and its samples (labels -> value)."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    samples: list[tuple[Mapping[str, str], float]] = field(default_factory=list)
    suffixes: list[str] = field(default_factory=list)  # per sample: "" or a histogram's _bucket, _sum, _count

    def add(self, value: float, suffix: str = "", **labels: str) -> Metric:
        self.samples.append((labels, value))
        self.suffixes.append(suffix)
        return self


@dataclass
class Histogram:
    """Observations counted in buckets (upper bounds), exposed as Prometheus cumulative `_bucket`, `_sum`, `_count`."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def into(self, metric: Metric, **labels: str) -> Metric:
        counts = self.counts or [0] * (len(self.bounds) + 1)
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            metric.add(running, "_bucket", le="+Inf" if bound == float("inf") else _number(bound), **labels)
        return metric.add(self.total, "_sum", **labels).add(running, "_count", **labels)


def process_cpu() -> Metric:
    """CPU seconds this process used (all threads, librdkafka's included)."""
    return Metric("cdp_process_cpu_seconds_total", "counter", "CPU seconds used by this process").add(time.process_time())


def merged(metrics: Iterable[Metric]) -> list[Metric]:
    """One family per name: several stages report samples of one metric (e.g. memos expired, by stage)."""
    families: dict[str, Metric] = {}
    for metric in metrics:
        family = families.setdefault(metric.name, Metric(metric.name, metric.kind, metric.help))
        family.samples.extend(metric.samples)
        family.suffixes.extend(metric.suffixes)
    return list(families.values())


def render(metrics: Iterable[Metric]) -> str:
    lines: list[str] = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {metric.help}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for (labels, value), suffix in zip(metric.samples, metric.suffixes, strict=True):
            label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            shown, name = _number(value), metric.name + suffix
            lines.append(f"{name}{{{label_text}}} {shown}" if label_text else f"{name} {shown}")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """Exact: a counter past a million must not print as 1.23457e+06."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
