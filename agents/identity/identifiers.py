"""Which identifiers an event carries, in priority order, with the blocked ones marked.

Segment's default identifier types (cdp-semantics.md §1.3): user_id (userId), anonymous_id, email
(traits.email or context.traits.email), device ids typed by the device type — `<type>.id` from
context.device.id, `<type>.idfa` from context.device.advertisingId when ad tracking is on, `<type>.push_token`
from context.device.token — group_id (groupId), custom ones from context.externalIds and from configured
trait/property paths. Blocked values stay on the event; they are returned marked, so they link nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agents.events import RawEvent
from agents.identity.rules import IdentityRules
from agents.paths import read_path


@dataclass(frozen=True)
class ExtractedIdentifier:
    """One identifier of an event; `blocked` ones are reported, never linked."""

    type: str
    value: str
    blocked: bool = False


def extract(event: RawEvent, rules: IdentityRules) -> list[ExtractedIdentifier]:
    """Every distinct (type, value) on the event, most trusted type first."""
    found: dict[tuple[str, str], None] = {}

    def add(type_: str, value: Any) -> None:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            text = str(value)
            if text:
                found.setdefault((type_, text), None)

    add("user_id", event.get("user_id"))
    add("anonymous_id", event.get("anonymous_id"))
    traits, context = event.get("traits") or {}, event.get("context") or {}
    add("email", traits.get("email") if event["type"] in ("identify",) else None)
    add("email", read_path(context, "traits.email"))
    if event["type"] == "group":
        add("group_id", event.get("group_id"))
    device = context.get("device") if isinstance(context.get("device"), dict) else {}
    kind = str(device.get("type") or "device").lower()
    add(f"{kind}.id", device.get("id"))
    if device.get("adTrackingEnabled"):
        add(f"{kind}.idfa", device.get("advertisingId"))
    add(f"{kind}.push_token", device.get("token"))
    externals = context.get("externalIds")
    for external in externals if isinstance(externals, list) else ():
        if isinstance(external, dict) and isinstance(external.get("type"), str):
            add(external["type"], external.get("id"))
    for rule in rules.identifiers:
        for path in rule.paths:
            add(rule.type, read_path(event, path))
    ordered = sorted(found, key=lambda tv: (rules.priority(tv[0]), tv[1]))
    return [ExtractedIdentifier(t, v, rules.is_blocked(v)) for t, v in ordered]
