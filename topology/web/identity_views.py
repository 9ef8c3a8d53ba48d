"""The identity web views: any worker answers, reading the owner's store or asking the owner over HTTP
(topology/web/routing.py, by partition of cdp.identity.commands). A merged profile answers with its survivor
(`requested_profile_id` says what was asked); `enrich` adds what other stages know of the profile (compute's
traits and audiences).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from agents.identity.protocol import identifier_key, identifier_record, profile_record
from topology.web.routing import Answer, Router

Enrich = Callable[[str, int], Awaitable[dict[str, Any]]]


class IdentityViews:
    """GET /v1/identifiers/{type}/{value}, /v1/profiles/{id}, /v1/profiles/{id}/merges."""

    def __init__(self, router: Router, enrich: Enrich | None = None) -> None:
        self.router = router
        self._enrich = enrich

    async def identifier(self, type_: str, value: str, hops: int) -> Answer:
        key = identifier_key(type_, value)
        store, answer = await self.router.local_or_remote(key, f"/v1/identifiers/{quote(type_, safe='')}/{quote(value, safe='')}", hops)
        if store is None:
            return answer
        record = store.get(identifier_record(type_, value))
        if record is None:
            return 404, {"error": f"no profile has the identifier {type_}:{value}"}
        return await self.profile(record["p"], hops, merges=False)

    async def profile(self, profile_id: str, hops: int, *, merges: bool, requested: str | None = None) -> Answer:
        path = f"/v1/profiles/{quote(profile_id, safe='')}" + ("/merges" if merges else "")
        store, answer = await self.router.local_or_remote(profile_id, path, hops)
        if store is None:
            if requested is not None and answer[0] == 200:
                answer[1]["requested_profile_id"] = requested
            return answer
        record = store.get(profile_record(profile_id))
        if record is None or record["status"] == "expected":
            return 404, {"error": f"no profile {profile_id}"}
        if record["status"] == "merged":
            return await self.profile(record["into"], hops, merges=merges, requested=requested or profile_id)
        body: dict[str, Any] = {"profile_id": profile_id}
        if requested is not None:
            body["requested_profile_id"] = requested
        if merges:
            body["merges"] = record["log"]
        else:
            body.update(
                created_at=record["created_at"],
                identifiers=[{"type": t, "value": v, "added_at": at} for t, v, at in record["ids"]],
                merged_from=record["merged_from"],
                merges=record["merges"],
            )
            if self._enrich is not None:
                body.update(await self._enrich(profile_id, hops))
        return 200, body
