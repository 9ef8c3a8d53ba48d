"""A worker stops within SHUTDOWN_TIMEOUT_S of being asked to, even while a partition's batch can't be written.

A batch that Kafka refuses is retried until it is written (topology/runtime/stalls.py). The stages read beneath Faust
(topology/runtime/input_feed.py), so stopping cancels such a batch with its reading task; but a stop can still hang on
what no task owns (a librdkafka call that does not return, a service of Faust's that waits on one). A watchdog
thread notices the app stopping; if the process is still alive SHUTDOWN_TIMEOUT_S later, it says which
partitions were stalled and exits hard. That is exactly a crash, which every stage is built to survive: nothing of
the unacknowledged batch was committed, so whoever owns the partition next reads it again.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT_S = 25.0  # under the 30 s that supervisors (and `cdp dev`) give a worker before SIGKILL
EXIT_CODE = 75  # EX_TEMPFAIL: stopped without finishing; a restart picks the work up


def watch_shutdown(stopping: Callable[[], bool], blocked: Callable[[], str], timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Start the watchdog (a daemon thread: a process that exits on its own takes it along)."""

    def watch() -> None:
        while not stopping():
            time.sleep(0.2)
        time.sleep(timeout_s)
        log.error("the worker did not stop within %.0fs of being asked to (%s); exiting now: what was not "
                  "acknowledged is read again by the partitions' next owner", timeout_s, blocked())  # fmt: skip
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(EXIT_CODE)

    threading.Thread(target=watch, name="shutdown-watchdog", daemon=True).start()
