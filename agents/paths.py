"""Dotted paths into event payloads (`traits.email`, `context.device.id`), as definitions and rules write them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def read_path(root: Any, dotted: str) -> Any:
    """The value at `dotted` under `root`; None where any step is missing or not an object."""
    node = root
    for step in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(step)
    return node
