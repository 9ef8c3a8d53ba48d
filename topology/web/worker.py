"""The worker's HTTP surface: profile, audience and backfill views, the definitions API, /health and /metrics.

Every input is checked before it is used, and a bad one is a 400 naming it: a partition in a path is a number
of a partition that exists, `limit` a positive whole number (larger than PAGE_MAX is cut to it), the
`X-CDP-Hops` header (set by workers forwarding a request, topology/web/routing.py) a small whole number; the admin
token is compared as bytes. A definition's body must arrive within a timeout (408) and stay under the
definition limits (agents/compute/definitions.py). Errors are JSON (topology/web/common.py). The views' logic
lives in topology/web/identity_views.py and topology/web/compute_views.py; this module only wires and checks.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import faust
import orjson
from faust.web import View

from agents.compute.definitions import MAX_DEFINITION_BYTES
from agents.errors import CdpError, ConfigError
from topology.web.compute_views import INTERNAL, PAGE_DEFAULT, PAGE_MAX, ComputeViews
from topology.codecs import Codecs
from topology.config import Settings
from topology.runtime.dead_letters import SyncLetter, sync_dead_letters
from topology.destinations import redacted
from topology.runtime.definitions_feed import KINDS, Conflict, DefinitionsFeed
from topology.web.common import HttpError, read_body, same_secret
from topology.web.identity_views import IdentityViews
from topology.web.metrics import Metric, render
from topology.runtime.producer import AsyncProducer
from topology.web.routing import HOPS_HEADER, MAX_HOPS
from topology.web.sync_views import INTERNAL as SYNC_INTERNAL
from topology.web.sync_views import SyncViews


def text_param(value: str, name: str) -> str:
    """A path or query parameter as text that has a UTF-8 spelling (a percent-encoded lone surrogate has none)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise HttpError(400, f"{name} is not valid UTF-8 text") from None
    return value


def whole(text: str) -> int | None:
    """A small whole number written in ASCII digits, or None (`int` of a 5,000-digit string raises, by design)."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 12 else None


def hops(request: Any) -> int:
    """How many workers forwarded this request so far (0 from a client)."""
    text = request.headers.get(HOPS_HEADER, "0") or "0"
    if (number := whole(text)) is None or number > MAX_HOPS:
        raise HttpError(400, f"{HOPS_HEADER} must be a whole number from 0 to {MAX_HOPS} (workers set it when they "
                             f"forward a request), not {text[:40]!r}")  # fmt: skip
    return number


def partition_param(text: str, partitions: int) -> int:
    """A partition number from a path: one that exists."""
    if (number := whole(text)) is None or number >= partitions:
        raise HttpError(400, f"partition must be a whole number from 0 to {partitions - 1}, not {text[:40]!r}")
    return number


def limit_param(request: Any) -> int:
    """`?limit=`: how many items a page holds, from 1; more than PAGE_MAX is cut to PAGE_MAX."""
    text = request.query.get("limit")
    if text is None:
        return PAGE_DEFAULT
    digits = text.lstrip("0") if text.isascii() and text.isdigit() else ""
    if not digits:
        raise HttpError(400, f"limit must be a whole number of at least 1 (at most {PAGE_MAX} are returned), "
                             f"not {text[:40]!r}")  # fmt: skip
    return PAGE_MAX if len(digits) > len(str(PAGE_MAX)) else min(int(digits), PAGE_MAX)


def register(
    app: faust.App,
    *,
    settings: Settings,
    views: IdentityViews,
    compute_views: ComputeViews,
    definitions: DefinitionsFeed,
    producer: Callable[[], AsyncProducer],
    partitions: int,
    stages: list[str],
    metrics: Callable[[], list[Metric]],
    sync_views: SyncViews,
) -> None:
    """Add the worker's routes to `app` (`partitions`: of the compute stage's input, for the internal views)."""

    @app.page("/v1/identifiers/{type}/{value}")
    async def _identifier(web: Any, request: Any, type: str, value: str) -> Any:
        status, body = await views.identifier(text_param(type, "type"), text_param(value, "value"), hops(request))
        return web.json(body, status=status)

    @app.page("/v1/profiles/{profile_id}")
    async def _profile(web: Any, request: Any, profile_id: str) -> Any:
        status, body = await views.profile(text_param(profile_id, "profile id"), hops(request), merges=False)
        return web.json(body, status=status)

    @app.page("/v1/profiles/{profile_id}/merges")
    async def _profile_merges(web: Any, request: Any, profile_id: str) -> Any:
        status, body = await views.profile(text_param(profile_id, "profile id"), hops(request), merges=True)
        return web.json(body, status=status)

    @app.page("/v1/audiences")
    async def _audiences(web: Any, request: Any) -> Any:
        status, body = await compute_views.audiences(hops(request))
        return web.json(body, status=status)

    @app.page("/v1/audiences/{key}/members")
    async def _members(web: Any, request: Any, key: str) -> Any:
        cursor = request.query.get("cursor")
        status, body = await compute_views.members(text_param(key, "audience"), cursor and text_param(cursor, "cursor"),
                                                   limit_param(request), hops(request))  # fmt: skip
        return web.json(body, status=status)

    @app.page(INTERNAL + "/profiles/{profile_id}")
    async def _compute_profile(web: Any, request: Any, profile_id: str) -> Any:
        status, body = await compute_views.profile(text_param(profile_id, "profile id"), hops(request))
        return web.json(body, status=status)

    @app.page(INTERNAL + "/sizes/{partition}")
    async def _sizes(web: Any, request: Any, partition: str) -> Any:
        status, body = await compute_views.sizes_in(partition_param(partition, partitions), hops(request))
        return web.json(body, status=status)

    @app.page("/v1/backfills")
    async def _backfills(web: Any, request: Any) -> Any:
        status, body = await compute_views.backfills(hops(request))
        return web.json(body, status=status)

    @app.page(INTERNAL + "/backfills/{partition}")
    async def _backfills_in(web: Any, request: Any, partition: str) -> Any:
        status, body = await compute_views.backfills_in(partition_param(partition, partitions), hops(request))
        return web.json(body, status=status)

    @app.page(INTERNAL + "/members/{key}/{partition}")
    async def _members_in(web: Any, request: Any, key: str, partition: str) -> Any:
        number, limit, after = partition_param(partition, partitions), limit_param(request), request.query.get("after", "")
        status, body = await compute_views.members_in(text_param(key, "audience"), number, text_param(after, "after"),
                                                      limit, hops(request))  # fmt: skip
        return web.json(body, status=status)

    @app.page("/v1/definitions/{kinds}")
    class _Definitions(View):
        async def get(self, request: Any, kinds: str) -> Any:
            kind = _kind(kinds)
            held = definitions.held(kind)
            return self.json({kinds: [{"definition": redacted(h.body), "version": h.version, "updated_at": h.updated_at,
                                       "origin": "config" if h.updated_at is None else "api"} for h in held]})  # fmt: skip

        async def post(self, request: Any, kinds: str) -> Any:
            kind = _kind(kinds)
            if not settings.admin_token:
                raise HttpError(403, "the definitions API is off: set CDP_ADMIN_TOKEN")
            if not same_secret(request.headers.get("Authorization", ""), f"Bearer {settings.admin_token}"):
                raise HttpError(401, "admin token missing or wrong (Authorization: Bearer <CDP_ADMIN_TOKEN>)")
            try:
                body = orjson.loads(await read_body(request, MAX_DEFINITION_BYTES))
            except orjson.JSONDecodeError as exc:
                raise HttpError(400, f"the body is not JSON: {exc}") from None
            try:
                held = await definitions.publish(kind, body, producer())
            except ConfigError as exc:
                raise HttpError(400, str(exc)) from None
            except Conflict as exc:
                raise HttpError(409, str(exc)) from None
            except CdpError as exc:
                raise HttpError(503, str(exc)) from None
            return self.json({"definition": redacted(held.body), "version": held.version, "updated_at": held.updated_at}, status=201)

    @app.page("/v1/destinations")
    async def _destinations(web: Any, request: Any) -> Any:
        status, body = await sync_views.destinations(hops(request))
        return web.json(body, status=status)

    @app.page(SYNC_INTERNAL)
    async def _destinations_here(web: Any, request: Any) -> Any:
        return web.json(sync_views.mine())

    codecs = Codecs(settings)

    @app.page("/v1/destinations/{name}/dead-letters")
    async def _dead_letters(web: Any, request: Any, name: str) -> Any:
        """The destination's dead letters, newest first (read from cdp.sync.dead-letter; `since`: epoch ms)."""
        destination, limit = text_param(name, "name"), limit_param(request)
        text = request.query.get("since", "0")
        if not (text.isascii() and text.isdigit() and len(text) <= 15):
            raise HttpError(400, f"since is epoch milliseconds, not {text[:40]!r}")
        since = int(text)
        letters = await asyncio.to_thread(lambda: deque(sync_dead_letters(settings, codecs, destination, since), maxlen=limit))
        return web.json({"destination": destination, "dead_letters": [_letter(letter) for letter in reversed(letters)]})

    @app.page("/health")
    async def _health(web: Any, request: Any) -> Any:
        return web.json({"status": "ok", "stages": stages})

    @app.page("/metrics")
    async def _metrics(web: Any, request: Any) -> Any:
        return web.text(render(metrics()))


def _letter(letter: SyncLetter) -> dict[str, Any]:
    value = letter.value
    try:
        delivery = orjson.loads(value["value"] or b"null")
    except orjson.JSONDecodeError:
        delivery = None
    return {"offset": letter.offset, "failed_at": value["failed_at"], "reason": value["reason"], "attempts": value["attempts"],
            "http_status": value["http_status"], "response": value["response"], "delivery": delivery,
            "change": {"topic": value["topic"], "partition": value["partition"], "offset": value["offset"]}}  # fmt: skip


def _kind(kinds: str) -> str:
    if kinds not in KINDS:
        raise HttpError(404, f"unknown definition kind {kinds[:40]!r}; one of {sorted(KINDS)}")
    return KINDS[kinds]
