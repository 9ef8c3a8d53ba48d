"""Prometheus text exposition for /metrics, shared by the worker and the ingest.

Counters only where a rate is what users want (events/s = rate(events_total), CPU-s per million events =
rate(cpu_seconds_total) / rate(events_total) * 1e6); gauges for lag and in-flight work.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass
class Metric:
    """One metric family: name, type, help and its samples (labels -> value)."""

    name: str
    kind: str  # "counter" | "gauge"
    help: str
    samples: list[tuple[Mapping[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> Metric:
        self.samples.append((labels, value))
        return self


def process_cpu() -> Metric:
    """CPU seconds this process used (all threads, librdkafka's included)."""
    return Metric("cdp_process_cpu_seconds_total", "counter", "CPU seconds used by this process").add(time.process_time())


def merged(metrics: Iterable[Metric]) -> list[Metric]:
    """One family per name: several stages report samples of one metric (e.g. memos expired, by stage)."""
    families: dict[str, Metric] = {}
    for metric in metrics:
        family = families.setdefault(metric.name, Metric(metric.name, metric.kind, metric.help))
        family.samples.extend(metric.samples)
    return list(families.values())


def render(metrics: Iterable[Metric]) -> str:
    lines: list[str] = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {metric.help}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for labels, value in metric.samples:
            label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            shown = _number(value)
            lines.append(f"{metric.name}{{{label_text}}} {shown}" if label_text else f"{metric.name} {shown}")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """Exact: a counter past a million must not print as 1.23457e+06."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
