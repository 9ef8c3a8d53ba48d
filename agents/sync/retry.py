"""The delivery rules: what an answer means, when to try again, and how fast a destination may be called.

- 2xx: delivered. 410: gone — the destination is turned off until its definition is POSTed again.
- 408, 429, 5xx, a timeout or a connection error: tried again after a jittered exponential backoff (equal jitter:
  half the step fixed, half random, so retries of many profiles spread out and never come at once), never sooner
  than a `Retry-After` asks, until the delivery is `max_age` old.
- Any other answer: given up at once (dead-lettered with the status and the start of the answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Verdict = Literal["delivered", "retry", "dead", "gone"]


@dataclass(frozen=True)
class Attempt:
    """What one try at a delivery (or a batch of them) came to."""

    status: int | None  # the HTTP status; None: no answer (timeout, connection refused, DNS)
    error: str | None = None  # why not, in words (None when delivered)
    retry_after_ms: int | None = None
    response: str | None = None  # the start of the answer's body
    outcome: Verdict | None = None  # what a destination without HTTP statuses (Kafka) says it came to


def verdict(attempt: Attempt) -> Verdict:
    if attempt.outcome is not None:
        return attempt.outcome
    status = attempt.status
    if status is None:
        return "retry"
    if 200 <= status < 300:
        return "delivered"
    if status == 410:
        return "gone"
    if status in (408, 429) or status >= 500:
        return "retry"
    return "dead"


def backoff_ms(attempts: int, base_ms: int, cap_ms: int, retry_after_ms: int | None, jitter: float) -> int:
    """The wait after the `attempts`-th failed try (1-based); `jitter` in [0, 1)."""
    step = min(cap_ms, base_ms * 2 ** min(max(attempts - 1, 0), 40))
    return int(max(step / 2 + jitter * step / 2, retry_after_ms or 0))


class TokenBucket:
    """A rate limit as a token bucket: `rate` calls per second on average, at most `burst` at once. `reserve` books
    the next call and says how long to wait for it (callers sleep that long), so concurrent senders share it."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens, self._at = burst, now

    def reserve(self, now: float, calls: int = 1) -> float:
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= calls
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def set_rate(self, rate: float) -> None:
        self.rate = rate
