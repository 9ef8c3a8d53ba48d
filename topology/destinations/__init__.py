"""Destination kinds: one module each, behind one protocol, found by name.

A kind module (webhook.py, ...) declares `KIND = Kind(name, check, open, secrets)`:
- `check(settings)`: the kind's own settings of a definition (everything but the keys every destination has,
  agents/sync/destinations.py), checked and normalised; ConfigError naming every problem;
- `open(destination)`: a Sender for it, made inside the worker's event loop;
- `secrets`: the settings never shown back (GET /v1/definitions/destinations redacts them).
A Sender makes one attempt at a batch of deliveries (at most `max_batch`, 1 unless the destination batches) and
says what it came to (agents/sync/retry.py: Attempt); it never raises for the destination's failures. Adding a
kind is adding a module here (and its tests): `KINDS` finds it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agents.sync.destinations import Destination, KindCheck
from agents.sync.payloads import Delivery
from agents.sync.retry import Attempt

REDACTED = "<redacted>"


class Sender(Protocol):
    max_batch: int

    async def send(self, deliveries: Sequence[Delivery]) -> Attempt:
        """One attempt at delivering these (one request for all of them); never raises for the destination's faults."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Kind:
    name: str
    check: KindCheck
    open: Callable[[Destination], Sender]
    secrets: tuple[str, ...] = ()


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
