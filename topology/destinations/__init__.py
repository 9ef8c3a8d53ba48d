"""Destination kinds: one module each, behind one protocol, found by name.

A kind module (webhook.py, ...) declares `KIND = Kind(name, check, open, secrets)`:
- `check(settings)`: the kind's own settings of a definition (everything but the keys every destination has,
  agents/sync/destinations.py), checked and normalised; ConfigError naming every problem;
- `open(destination, context)`: a Sender for it, made inside the worker's event loop (`context`: what the worker
  gives every kind, e.g. its own Kafka cluster);
- `secrets`: the settings never shown back (GET /v1/definitions/destinations redacts them).
A Sender makes one attempt at a batch of deliveries (at most `max_batch`, 1 unless the destination batches) and
says what it came to (agents/sync/retry.py: Attempt), for the whole batch or one per delivery (a warehouse that
refuses one row and takes the rest); it never raises for the destination's failures. Adding a
kind is adding a module here (and its tests): `KINDS` finds it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agents.durations import parse_duration_ms
from agents.errors import ConfigError
from agents.sync.destinations import Destination, KindCheck
from agents.sync.payloads import Delivery
from agents.sync.retry import Attempt

REDACTED = "<redacted>"


class Sender(Protocol):
    max_batch: int

    async def send(self, deliveries: Sequence[Delivery]) -> Attempt | Sequence[Attempt]:
        """One attempt at delivering these (one request for all of them): its answer, or one per delivery in their
        order; never raises for the destination's faults."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class SenderContext:
    """What a worker gives every Sender it opens."""

    bootstrap: str  # the pipeline's own Kafka cluster


@dataclass(frozen=True)
class Kind:
    name: str
    check: KindCheck
    open: Callable[[Destination, SenderContext], Sender]
    secrets: tuple[str, ...] = ()


class Settings:
    """A kind's settings being checked: each read names its problem and falls back to its default, so one
    ConfigError (`done`) lists every problem of the definition."""

    def __init__(self, kind: str, settings: Mapping[str, Any], known: Sequence[str]) -> None:
        self.kind, self.settings, self.problems = kind, settings, []  # type: list[str]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            self.problems.append(f"unknown {kind} setting {', '.join(unknown)}; {kind} settings: {', '.join(known)}")

    def get(self, key: str) -> Any:
        return self.settings.get(key)

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def duration_ms(self, key: str, default: str, low_ms: int, high_ms: int) -> int:
        try:
            value = parse_duration_ms(self.settings.get(key, default))
            if not low_ms <= value <= high_ms:
                raise ValueError(f"must be from {low_ms} ms to {high_ms // 1000} s")
        except (ValueError, TypeError) as exc:
            self.problems.append(f"{key}: {exc}")
            return parse_duration_ms(default)
        return value

    def batch_size(self, default: int, most: int) -> int:
        batch = self.settings.get("batch") or {"size": default}
        size = batch.get("size") if isinstance(batch, Mapping) else None
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= most or set(batch) - {"size"}:
            self.problems.append(f"batch is {{size: 1..{most}}}, not {batch!r:.60}")
            return default
        return size

    def done(self, checked: dict[str, Any]) -> dict[str, Any]:
        if self.problems:
            raise ConfigError("; ".join(self.problems))
        return checked


def _discover() -> dict[str, Kind]:
    kinds: dict[str, Kind] = {}
    for module in pkgutil.iter_modules(__path__):
        kind = getattr(importlib.import_module(f"{__name__}.{module.name}"), "KIND", None)
        if isinstance(kind, Kind):
            kinds[kind.name] = kind
    return kinds


KINDS: Mapping[str, Kind] = _discover()
CHECKS: Mapping[str, KindCheck] = {name: kind.check for name, kind in KINDS.items()}


def redacted(body: Mapping[str, Any]) -> dict[str, Any]:
    """A definition as it may be shown: the kind's secrets replaced."""
    kind = KINDS.get(str(body.get("kind")))
    hidden = kind.secrets if kind is not None else ()
    return {key: (REDACTED if key in hidden and value is not None else value) for key, value in body.items()}
