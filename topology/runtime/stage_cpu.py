"""CPU each stage spends in its own code, per worker: `cdp_stage_cpu_seconds_total{stage}` on /metrics.

Measured with the calling thread's CPU clock around a stage's synchronous work (deciding a batch, encoding its
changelog, writing its transaction from a worker thread, applying it to RocksDB), so coroutines interleaving on
the event loop are not charged to each other. What is left of the process's CPU (`cdp_process_cpu_seconds_total`
minus the stages) is the machinery around them: Faust's streams and acks, aiokafka's fetch path, librdkafka's
own threads, the web server, the garbage collector when it runs outside a stage.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from topology.web.metrics import Metric

_spent: defaultdict[str, float] = defaultdict(float)


@contextmanager
def spent_by(stage: str) -> Iterator[None]:
    """Charge the CPU this thread uses inside the block to `stage` (never around an `await`)."""
    started = time.thread_time()
    try:
        yield
    finally:
        _spent[stage] += time.thread_time() - started


def stage_cpu() -> Metric:
    metric = Metric("cdp_stage_cpu_seconds_total", "counter", "CPU seconds spent in each stage's own code (not Faust's)")
    for stage, seconds in sorted(_spent.items()):
        metric.add(seconds, stage=stage)
    return metric


class CycleTimes:
    """Wall time of a stage's poll cycles (decide, deliver, one transaction): an event waits for the cycle in
    progress and then its own at every stage, so these bound its latency. On /metrics as the cycles' count, their
    total seconds, how many took longer than SLOW_S and the longest since start."""

    SLOW_S = 0.25

    def __init__(self) -> None:
        self.count, self.seconds, self.slow, self.longest = 0, 0.0, 0, 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds
        self.slow += seconds > self.SLOW_S
        self.longest = max(self.longest, seconds)

    def metrics(self, stage: str) -> list[Metric]:
        return [
            Metric("cdp_cycles_total", "counter", "poll cycles a stage ran").add(self.count, stage=stage),
            Metric("cdp_cycle_seconds_total", "counter", "wall seconds of a stage's poll cycles").add(self.seconds, stage=stage),
            Metric("cdp_cycles_slow_total", "counter", f"poll cycles longer than {self.SLOW_S} s").add(self.slow, stage=stage),
            Metric("cdp_cycle_longest_seconds", "gauge", "a stage's longest poll cycle since start").add(self.longest, stage=stage),
        ]
