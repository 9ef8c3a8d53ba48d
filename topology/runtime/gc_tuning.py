"""The worker's garbage collector: collected less often, start-up objects frozen, its time on /metrics.

A stage allocates many short-lived containers per event (decoded records, JSON state, outputs) and creates
almost no reference cycles, yet CPython's default (a young collection every 700 net allocations, each older
one scanning every tracked object that survived before) took 11 % of a worker's samples. Reference counting
frees nearly all of it; the collector is only there for cycles. So: young collections every `YOUNG` net
allocations, and after start-up everything alive then (modules, Faust's app, schemas, definitions) is moved
to the permanent generation (`gc.freeze()`) so full collections stop re-scanning it. `cdp_gc_seconds_total`
shows what the collector still costs, `cdp_gc_longest_seconds` its longest pause (every stage of the worker
waits it out: an event's latency).
"""

from __future__ import annotations

import gc
import time
from typing import Any

from topology.web.metrics import Metric

YOUNG = 50_000  # net allocations between young collections (CPython: 700)
OLDER = (20, 20)  # young collections per middle one, middle per full one (CPython: 10, 10)

_spent = [0.0, 0.0, 0.0]
_longest = [0.0, 0.0, 0.0]  # the longest single collection per generation: a pause every stage waits out
_started = [0.0]


def _account(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        took = time.perf_counter() - _started[0]
        _spent[info["generation"]] += took
        _longest[info["generation"]] = max(_longest[info["generation"]], took)


def tune() -> None:
    """Set the thresholds and account collections; call once, before the app is built."""
    gc.set_threshold(YOUNG, *OLDER)
    if _account not in gc.callbacks:
        gc.callbacks.append(_account)


def freeze_start_up() -> None:
    """Move every object alive now out of the collector's sight; call once the worker has started."""
    gc.collect()
    gc.freeze()


def gc_seconds() -> list[Metric]:
    metric = Metric("cdp_gc_seconds_total", "counter", "wall seconds the garbage collector ran, by generation")
    longest = Metric("cdp_gc_longest_seconds", "gauge", "the longest single collection since start, by generation")
    for generation, seconds in enumerate(_spent):
        metric.add(seconds, generation=str(generation))
        longest.add(_longest[generation], generation=str(generation))
    return [metric, longest]
