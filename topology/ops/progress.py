"""A progress bar for long commands (`cdp backfill`, `cdp replay`): redrawn in place on a terminal, a line every
few seconds otherwise (CI logs, pipes), so both show where the work is without flooding either."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30
LOG_EVERY_S = 5.0


class Progress:
    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._logged = 0.0

    def update(self, done: int, total: int, detail: str = "") -> None:
        share = 1.0 if total <= 0 else min(done / total, 1.0)
        elapsed = time.monotonic() - self.started
        line = f"{self.label} {share * 100:5.1f}% {done:,}/{total:,} {elapsed:5.1f}s {detail}".rstrip()
        if self.tty:
            bar = "#" * int(share * WIDTH)
            self.stream.write(f"\r[{bar:<{WIDTH}}] {line}\x1b[K")
            self.stream.flush()
        elif elapsed - self._logged >= LOG_EVERY_S:
            self._logged = elapsed
            print(line, file=self.stream, flush=True)

    def finish(self) -> float:
        """Ends the bar's line; returns the seconds it ran."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        return time.monotonic() - self.started
