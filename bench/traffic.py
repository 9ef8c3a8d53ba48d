"""Realistic Segment traffic: one generator for `cdp bench pipeline` and `cdp generate`.

Visitors arrive anonymously, browse (page calls, `Product Viewed`), most identify themselves (identify with
email and plan traits, so identity merges the anonymous profile into the user's), some buy (`Order Completed`
with `revenue`, `currency` and products), and some come back later on a second device (a new anonymousId that
identifies as the same user: a merge of two existing profiles). Many visitors are active at once, so their
calls interleave as on a real site; each visitor's own calls keep their order. Every messageId is unique, and
the same seed gives the same traffic.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

PAGES = (("Home", "/"), ("Pricing", "/pricing"), ("Shoes", "/c/shoes"), ("Bags", "/c/bags"), ("Blog", "/blog"),
         ("Launch post", "/blog/launch"), ("Cart", "/cart"), ("Account", "/account"))  # fmt: skip
PRODUCTS = tuple((f"sku-{i:03d}", f"Product {i}", ("shoes", "bags", "shirts", "hats")[i % 4], round(9.5 + i * 3.25, 2)) for i in range(60))
PLANS = ("free", "free", "free", "pro", "enterprise")
CURRENCIES = ("USD", "USD", "USD", "EUR", "GBP")
IDENTIFY_SHARE = 0.6  # of visitors
BUY_SHARE = 0.5  # of identified visitors
RETURN_SHARE = 0.15  # of identified visitors: a second device later
ACTIVE_VISITORS = 64  # journeys interleaved at any time
CONTEXT = {"library": {"name": "cdp-generate", "version": "2"}, "locale": "en-US",
           "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"}  # fmt: skip


@dataclass
class Journey:
    """One visitor's calls still to come, in order."""

    calls: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Traffic:
    """A stream of Segment calls (the JSON an SDK sends), stamped `span_ms` back from `end_ms` to it."""

    run: str
    seed: int = 7
    span_ms: int = 3_600_000
    end_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    visitors: int = 0  # people who started a journey so far (each one profile once merged)
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(f"{self.seed}-{self.run}")

    def calls(self, count: int) -> list[dict[str, Any]]:
        """`count` calls, each with a unique messageId and an originalTimestamp spread evenly over the span."""
        out: list[dict[str, Any]] = []
        active: list[Journey] = []
        later: list[Journey] = []  # second-device journeys, started once enough others went by
        step = self.span_ms / max(count, 1)
        for position, call in enumerate(self._interleave(active, later)):
            if position >= count:
                break
            at = int(self.end_ms - self.span_ms + position * step)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at / 1000)) + f".{at % 1000:03d}Z"
            out.append({**call, "messageId": f"{self.run}-{position:09d}", "originalTimestamp": stamp, "context": CONTEXT})
        return out

    def batches(self, count: int, size: int = 100) -> Iterator[dict[str, Any]]:
        """The calls as /v1/batch bodies of `size` calls each."""
        calls = self.calls(count)
        for start in range(0, len(calls), size):
            yield {"batch": calls[start : start + size]}

    def _interleave(self, active: list[Journey], later: list[Journey]) -> Iterator[dict[str, Any]]:
        rng = self._rng
        while True:
            while len(active) < ACTIVE_VISITORS:
                active.append(later.pop(0) if later and rng.random() < 0.2 else self._journey(later))
            journey = active[rng.randrange(len(active))]
            yield journey.calls.pop(0)
            if not journey.calls:
                active.remove(journey)

    def _journey(self, later: list[Journey]) -> Journey:
        rng, n = self._rng, self.visitors
        self.visitors += 1
        anonymous = f"anon-{self.run}-{n}"
        calls = self._browse(rng, {"anonymousId": anonymous})
        if rng.random() < IDENTIFY_SHARE:
            user = {"anonymousId": anonymous, "userId": f"user-{self.run}-{n}"}
            traits = {"email": f"person{n}@{self.run}.example", "plan": rng.choice(PLANS), "name": f"Person {n}"}
            calls.append({"type": "identify", **user, "traits": traits})
            if rng.random() < BUY_SHARE:
                for _ in range(rng.randint(1, 3)):
                    calls.append(self._order(rng, user))
                    calls.extend(self._browse(rng, user, most=2))
            if rng.random() < RETURN_SHARE:
                device = {"anonymousId": f"anon-{self.run}-{n}-b"}
                second = self._browse(rng, device, most=3)
                second.append({"type": "identify", **device, "userId": user["userId"], "traits": {"plan": rng.choice(PLANS)}})
                second.append(self._order(rng, {**device, "userId": user["userId"]}))
                later.append(Journey(second))
        return Journey(calls)

    def _browse(self, rng: random.Random, who: dict[str, str], most: int = 5) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = []
        for _ in range(rng.randint(1, most)):
            if rng.random() < 0.6:
                name, path = rng.choice(PAGES)
                calls.append({"type": "page", **who, "name": name,
                              "properties": {"path": path, "url": f"https://shop.example{path}", "title": name}})  # fmt: skip
            else:
                sku, name, category, price = rng.choice(PRODUCTS)
                calls.append({"type": "track", **who, "event": "Product Viewed",
                              "properties": {"product_id": sku, "sku": sku, "name": name, "category": category,
                                             "price": price, "currency": "USD"}})  # fmt: skip
        return calls

    def _order(self, rng: random.Random, who: dict[str, str]) -> dict[str, Any]:
        products = [rng.choice(PRODUCTS) for _ in range(rng.randint(1, 3))]
        revenue = round(sum(price for *_, price in products), 2)
        properties = {"order_id": f"o-{rng.getrandbits(48):012x}", "revenue": revenue, "total": revenue,
                      "currency": rng.choice(CURRENCIES), "items": len(products),
                      "products": [{"product_id": sku, "name": name, "price": price, "quantity": 1} for sku, name, _, price in products]}  # fmt: skip
        if rng.random() < 0.2:
            properties["coupon"] = "SAVE10"
        return {"type": "track", **who, "event": "Order Completed", "properties": properties}
