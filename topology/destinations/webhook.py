"""The `webhook` kind: each delivery POSTed as JSON (Segment's shapes, agents/sync/payloads.py), signed as Standard
Webhooks sign them.

    {"name": "crm", "kind": "webhook", "url": "https://crm.example/hooks/cdp", "secret": "whsec_<base64>",
     "timeout": "10s", "batch": {"size": 100}}

Headers: `webhook-id` (the delivery's id, the same on every retry: the receiver's idempotency key), `webhook-timestamp`
(seconds, this attempt's), `webhook-signature` (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, one per secret:
during a rotation `secret` is a list of two and both sign). With `batch.size` > 1 one request carries up to that many
deliveries as `{"batch": [...]}`, each with its own `messageId`; the request's id is derived from theirs.
`secret` is write-only: the definitions API shows it redacted.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from agents.sync.destinations import Destination
from agents.sync.payloads import Delivery
from agents.sync.retry import Attempt
from topology.destinations import Kind, SenderContext, Settings

SECRET_PREFIX = "whsec_"
MAX_BATCH = 1_000
RESPONSE_CHARS = 1_000


def check(settings: Mapping[str, Any]) -> dict[str, Any]:
    checking = Settings("webhook", settings, ("url", "secret", "timeout", "batch"))
    url = settings.get("url")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        checking.problem(f"url must be an http:// or https:// URL with a host, not {url!r:.80}")
    secrets = settings.get("secret")
    secrets = [secrets] if isinstance(secrets, str) else secrets
    if not isinstance(secrets, list) or not 1 <= len(secrets) <= 2 or not all(_key(s) for s in secrets):
        checking.problem("secret is required: 'whsec_' followed by base64 (at least 24 bytes), or a list of two during a rotation")
    timeout = checking.duration_ms("timeout", "10s", 1, 300_000)
    return checking.done({"url": url, "secrets": secrets, "timeout_ms": timeout, "batch_size": checking.batch_size(1, MAX_BATCH)})


def _key(secret: Any) -> bytes | None:
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        return None
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except ValueError:
        return None
    return key if len(key) >= 24 else None


def signature(keys: Sequence[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in keys)


def batch_id(ids: Sequence[str]) -> str:
    return "msg_" + hashlib.sha256("\x00".join(ids).encode()).hexdigest()[:32]


class WebhookSender:
    def __init__(self, destination: Destination, context: SenderContext) -> None:
        settings = destination.settings
        self.url, self.max_batch = settings["url"], settings["batch_size"]
        self._keys = [_key(secret) for secret in settings["secrets"]]
        self._timeout = aiohttp.ClientTimeout(total=settings["timeout_ms"] / 1000)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=destination.concurrency))

    async def send(self, deliveries: Sequence[Delivery]) -> Attempt:
        if self.max_batch == 1:
            ident, body = deliveries[0].id, orjson.dumps(deliveries[0].payload)
        else:
            ident, body = batch_id([d.id for d in deliveries]), orjson.dumps({"batch": [d.payload for d in deliveries]})
        stamp = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": ident, "webhook-timestamp": str(stamp),
                   "webhook-signature": signature(self._keys, ident, stamp, body)}  # type: ignore[arg-type]  # fmt: skip
        try:
            async with self._session.post(self.url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False) as response:
                text = (await response.content.read(RESPONSE_CHARS)).decode("utf-8", "replace")
                status = response.status
                retry_after = _retry_after_ms(response.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            return Attempt(None, f"no answer within {self._timeout.total:g}s")
        except aiohttp.ClientError as exc:
            return Attempt(None, f"{type(exc).__name__}: {exc}"[:300])
        return Attempt(status, None if 200 <= status < 300 else f"HTTP {status}", retry_after, text)

    async def close(self) -> None:
        await self._session.close()


def _retry_after_ms(value: str | None) -> int | None:
    if not value:
        return None
    if value.strip().isdigit():
        return int(value.strip()) * 1000
    try:
        return max(int((parsedate_to_datetime(value).timestamp() - time.time()) * 1000), 0)
    except (TypeError, ValueError):
        return None


KIND = Kind("webhook", check, WebhookSender, secrets=("secret",))
