"""What a profile change becomes for a destination: Segment's calls, as Engage sends them, each with a stable id.

- An audience change: identify `{"traits": {"<audience>": true|false}}` and/or track `Audience Entered` /
  `Audience Exited` with `properties.audience_key` (the destination's `audience_calls`).
- A trait change: identify `{"traits": {"<trait>": <new value>}}`.
Both carry the profile's userId / anonymousId (top level) and email (identify: traits.email; track:
context.traits.email) as compute last knew them, and `context.personas` naming the computation. The receiver
knows whom a call is about and which computation moved, without a lookup.

A delivery's id (the Standard Webhooks `webhook-id`, the payload's `messageId`, the Kafka `cdp-delivery-id`) is
derived from the destination, the profile, the change's per-profile `seq` and the call: every retry, redelivery
and restart sends the same change with the same id, which is what a receiver deduplicates on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agents.sync.destinations import Destination

Payload = dict[str, Any]


@dataclass(frozen=True)
class Delivery:
    """One call to one destination, as its queue keeps it until the destination took it."""

    id: str
    profile_id: str
    seq: int
    call: str  # "identify" | "track"
    subject: str  # what it sets, e.g. "audience:big_spenders", "trait:ltv": a newer one for it supersedes it
    payload: Payload
    happened_at: int  # the change's event time (ms)


def delivery_id(destination: str, profile_id: str, seq: int, call: str) -> str:
    digest = hashlib.sha256(f"{destination}\x00{profile_id}\x00{seq}\x00{call}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def membership_deliveries(change: dict[str, Any], destination: Destination) -> list[Delivery]:
    """The calls an AudienceMembershipChange makes to `destination` (none if it does not want the audience)."""
    audience = change["audience"]
    if not destination.wants_audience(audience):
        return []
    member = change["transition"] == "entered"
    personas = {"computation_class": "audience", "computation_key": audience, "computation_id": audience}
    out = []
    for call in destination.audience_calls:
        if call == "identify":
            body = _call("identify", change, {"traits": _with_email({audience: member}, change)}, personas)
        else:
            body = _call("track", change, {"event": "Audience Entered" if member else "Audience Exited",
                                           "properties": {"audience_key": audience, audience: member}}, personas)  # fmt: skip
        out.append(_delivery(destination, change, call, f"audience:{audience}", body))
    return out


def trait_deliveries(change: dict[str, Any], destination: Destination) -> list[Delivery]:
    """The identify a ProfileChange makes to `destination` (none if it does not want the trait)."""
    trait = change["trait"]
    if not destination.wants_trait(trait):
        return []
    personas = {"computation_class": "trait" if change["origin"] == "computed" else "identify", "computation_key": trait}
    body = _call("identify", change, {"traits": _with_email({trait: change["new_value"]}, change)}, personas)
    return [_delivery(destination, change, "identify", f"trait:{trait}", body)]


def _call(kind: str, change: dict[str, Any], fields: Payload, personas: Payload) -> Payload:
    body: Payload = {"type": kind}
    for key, name in (("user_id", "userId"), ("anonymous_id", "anonymousId")):
        if change.get(key):
            body[name] = change[key]
    body.update(fields)
    context: Payload = {"personas": personas}
    if kind == "track" and change.get("email"):
        context["traits"] = {"email": change["email"]}
    body["context"] = context
    body["timestamp"] = iso_ms(change["timestamp"])
    return body


def _with_email(traits: Payload, change: dict[str, Any]) -> Payload:
    email = change.get("email")
    return traits if not email or "email" in traits else {**traits, "email": email}


def _delivery(destination: Destination, change: dict[str, Any], call: str, subject: str, body: Payload) -> Delivery:
    ident = delivery_id(destination.name, change["profile_id"], change["seq"], call)
    body["messageId"] = ident
    return Delivery(ident, change["profile_id"], change["seq"], call, subject, body, change["timestamp"])
