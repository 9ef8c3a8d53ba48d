"""What `cdp bench compute` feeds the stage: a realistic mix of trait and audience definitions, and synthetic
ResolvedEvents for a population of profiles. bench/compute.py measures; this module only makes input."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

from topology.codecs import AvroCodec, SchemaRepository

PROFILES = 5_000
TRAIT_SHARE = 0.6
ACTIVE = {"key": "active", "when": {"event": "Order Completed", "within": "1h"}}  # the latency runs' audience


# -- definitions ---------------------------------------------------------------------------------------------

CATEGORIES = ("shoes", "bags", "shirts", "hats", "books", "toys")
PATHS = ("/", "/pricing", "/docs", "/docs/start", "/blog", "/blog/launch", "/product/1", "/product/2", "/cart", "/account")
CURRENCIES = ("USD", "USD", "USD", "EUR", "GBP")
PLANS = ("free", "free", "pro", "enterprise")
TRAIT_SHAPES = (  # (kind, event, property): every kind twice, over the three event types and "any track event"
    ("count", "Order Completed", None), ("sum", "Order Completed", "amount"), ("avg", "Order Completed", "amount"),
    ("min", "Product Viewed", "price"), ("max", "Order Completed", "amount"), ("first", "Page Viewed", "path"),
    ("last", "Product Viewed", "sku"), ("most_frequent", "Product Viewed", "category"),
    ("unique_list", "Order Completed", "currency"), ("unique_count", "Product Viewed", "sku"),
    ("count", "Page Viewed", None), ("sum", "Order Completed", "items"), ("avg", "Product Viewed", "price"),
    ("min", "Order Completed", "amount"), ("max", "Page Viewed", "scroll"), ("first", "Order Completed", "coupon"),
    ("last", None, "category"), ("most_frequent", "Page Viewed", "category"),
    ("unique_list", "Product Viewed", "category"), ("unique_count", "Page Viewed", "path"),
)  # fmt: skip
WINDOWS = (None, "1h", None, "7d", None, "30d")  # half of the traits all-time
WHERES: dict[str | None, tuple[dict[str, Any], ...]] = {  # per event, conditions on its own properties
    "Order Completed": ({"property": "currency", "eq": "USD"}, {"property": "amount", "gte": 50},
                        {"not": {"property": "coupon", "exists": True}}),
    "Product Viewed": ({"property": "category", "in": ["shoes", "bags"]},
                       {"all": [{"property": "price", "lt": 100}, {"property": "currency", "eq": "USD"}]}),
    "Page Viewed": ({"property": "path", "contains": "/product"},
                    {"any": [{"property": "category", "eq": "docs"}, {"property": "scroll", "gte": 80}]}),
    None: ({"property": "currency", "exists": True},),
}  # fmt: skip
SAMPLE_VALUE = {"currency": "USD", "category": "shoes", "sku": "sku-7", "path": "/pricing", "coupon": "SAVE10"}
LEAF_EVENTS = ("Order Completed", "Product Viewed", "Page Viewed")
WITHINS = ("1h", "24h", "7d", "30d")


def definitions(count: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`count` definitions, 60 % traits and 40 % audiences (the first is `active`), the same for the same count."""
    n_traits = round(count * TRAIT_SHARE)
    traits = []
    for i in range(n_traits):
        kind, event, prop = TRAIT_SHAPES[i % len(TRAIT_SHAPES)]
        trait: dict[str, Any] = {"key": f"t{i:03d}_{kind}", "kind": kind}
        if event is not None:
            trait["event"] = event
        if prop is not None:
            trait["property"] = prop
        if WINDOWS[i % len(WINDOWS)] is not None:
            trait["window"] = WINDOWS[i % len(WINDOWS)]
        if i % 3 == 2:
            trait["where"] = WHERES[event][(i // 3) % len(WHERES[event])]
        traits.append(trait)
    audiences = [ACTIVE]
    for j in range(1, count - n_traits):
        a, b = traits[(j * 7) % n_traits], traits[(j * 11 + 3) % n_traits]
        shape = j % 5
        if shape == 0:
            when: dict[str, Any] = {"all": [_trait_leaf(a), _event_leaf(j)]}
        elif shape == 1:
            when = {"any": [_event_leaf(j), _trait_leaf(a), {"audience": audiences[j - 1]["key"]}]}
        elif shape == 2:
            when = {"all": [_trait_leaf(a), {"not": {"audience": audiences[j // 2]["key"]}}]}
        elif shape == 3:
            when = {"not": _event_leaf(j)}
        else:
            when = {"all": [{"any": [_trait_leaf(a), _trait_leaf(b)]}, {"trait": "traits.plan", "in": ["pro", "enterprise"]}]}
        audiences.append({"key": f"a{j:03d}", "when": when})
    return traits, audiences


def _trait_leaf(trait: dict[str, Any]) -> dict[str, Any]:
    kind, key = trait["kind"], trait["key"]
    if kind in ("count", "unique_count"):
        return {"trait": key, "gte": 2}
    if kind in ("sum", "max"):
        return {"trait": key, "gte": 100}
    if kind == "avg":
        return {"trait": key, "gte": 50}
    if kind == "min":
        return {"trait": key, "lte": 20}
    if kind == "unique_list":
        return {"trait": key, "contains": SAMPLE_VALUE[trait["property"]]}
    return {"trait": key, "eq": SAMPLE_VALUE[trait["property"]]}  # first, last, most_frequent


def _event_leaf(j: int) -> dict[str, Any]:
    event = LEAF_EVENTS[j % len(LEAF_EVENTS)]
    leaf: dict[str, Any] = {"event": event, "within": WITHINS[j % len(WITHINS)]}
    if j % 5 == 0:
        leaf["where"] = WHERES[event][0]
    if j % 3 == 1:
        leaf["count"] = {"gte": 2}
    return leaf


# -- input ---------------------------------------------------------------------------------------------------


def resolved_event(rng: random.Random, profile_id: str, message_id: str, at: int, kind: str) -> dict[str, Any]:
    """A ResolvedEvent as identity would have written it: `kind` is a track event name, "page" or "identify"."""
    properties: dict[str, Any] = {}
    traits: dict[str, Any] = {}
    name = event = category = None
    if kind == "Order Completed":
        properties = {"order_id": message_id, "amount": round(rng.uniform(5, 300), 2), "currency": rng.choice(CURRENCIES),
                      "items": rng.randint(1, 5), "category": rng.choice(CATEGORIES)}  # fmt: skip
        if rng.random() < 0.3:
            properties["coupon"] = "SAVE10"
    elif kind == "Product Viewed":
        properties = {"sku": f"sku-{rng.randrange(200)}", "price": round(rng.uniform(3, 250), 2), "currency": rng.choice(CURRENCIES),
                      "category": rng.choice(CATEGORIES), "name": f"Product {rng.randrange(200)}"}  # fmt: skip
    elif kind == "page":
        path = rng.choice(PATHS)
        name, category = path.strip("/").split("/")[0] or "home", "docs" if path.startswith("/docs") else "site"
        properties = {"path": path, "url": f"https://shop.example{path}", "title": name.title(), "category": category,
                      "scroll": rng.randrange(101)}  # fmt: skip
    else:
        traits = {"plan": rng.choice(PLANS), "email": f"{profile_id}@example.com"}
    call = "track" if kind in ("Order Completed", "Product Viewed") else kind
    if call == "track":
        event = kind
    raw = {
        "message_id": message_id, "type": call, "source": "bench", "user_id": profile_id, "anonymous_id": None,
        "event": event, "name": name, "category": category, "group_id": None, "previous_id": None,
        "properties": properties, "traits": traits,
        "context": {"library": {"name": "cdp-bench", "version": "1"}, "ip": "10.0.0.1", "locale": "en-US",
                    "userAgent": "Mozilla/5.0 (X11; Linux x86_64)"},
        "integrations": {}, "timestamp": at, "original_timestamp": at, "sent_at": at, "received_at": at, "extra": {},
    }  # fmt: skip
    return {"profile_id": profile_id, "identifiers": [{"type": "user_id", "value": profile_id}], "event": raw}


def event_stream(events: int, run: str, profiles: int = PROFILES, seed: int = 1) -> list[dict[str, Any]]:
    """`events` events over `profiles` profiles, stamped evenly over the ten minutes up to now."""
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    stream = []
    for i in range(events):
        r = rng.random()
        kind = "Order Completed" if r < 0.2 else "Product Viewed" if r < 0.7 else "page" if r < 0.95 else "identify"
        at = now - 600_000 + i * 600_000 // max(events, 1)
        stream.append(resolved_event(rng, f"{run}-p{rng.randrange(profiles)}", f"{run}-m{i}", at, kind))
    return stream


def encode(stream: Sequence[dict[str, Any]]) -> list[tuple[bytes, bytes]]:
    codec = AvroCodec("resolved_event", SchemaRepository.load())
    return [(event["profile_id"].encode(), codec.encode(event)) for event in stream]
