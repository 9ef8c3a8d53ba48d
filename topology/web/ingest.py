"""The HTTP ingest: Segment's Tracking API on aiohttp, writing accepted calls to cdp.events.accepted.

Stateless, so run as many `cdp ingest` processes as the load needs. A request is answered 200 only after
Kafka acknowledged every one of its events (acks=all); a request with any bad message is rejected whole (400,
each problem named), so nothing of it enters the pipeline. Overload is 429 with Retry-After: too many events
waiting for Kafka in this process (`ingest.max_in_flight`), or the pipeline lagging behind the ingests by more
than `ingest.max_lag` events, read from Kafka (topology/runtime/pipeline_lag.py). Deduplication by messageId happens
behind, in the dedup stage, because every copy of a messageId must meet in one place whichever ingest received it.

Endpoints: POST /v1/{track,identify,page,screen,group,alias} (and analytics.js's short /v1/{t,i,p,s,g,a}),
/v1/batch (/v1/b) and /v1/import; GET /v1/projects/{writeKey}/settings (analytics.js), /health and /metrics. Auth: HTTP Basic with the write key as user name,
or `writeKey` in the body. Every error is JSON naming the problem, bodies must arrive within a timeout (408), and
no input answers 5xx but Kafka not acknowledging (503) — topology/web/common.py.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from agents.errors import DeliveryFailed, InvalidMessage
from agents.ingest.tracking import (
    MAX_BATCH_BYTES,
    MAX_EVENT_BYTES,
    MessageProblem,
    batch_to_raw_events,
    to_raw_event,
)
from topology.codecs import AvroCodec
from topology.web.common import BODY_TIMEOUT_S, HttpError, json_errors, read_body
from topology.web.metrics import Metric, process_cpu, render
from topology.runtime.pipeline_lag import PipelineLag
from topology.runtime.producer import AsyncProducer, Record

SINGLE_CALLS = {
    "track": "track", "identify": "identify", "page": "page", "screen": "screen", "group": "group",
    "alias": "alias", "t": "track", "i": "identify", "p": "page", "s": "screen", "g": "group", "a": "alias",
}  # fmt: skip
BATCH_CALLS = ("batch", "b", "import")
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Content-Encoding",
    "Access-Control-Max-Age": "86400",
}


class Rejected(Exception):
    """A request answered with an error status; carries the JSON body to send."""

    def __init__(self, status: int, error: str, problems: list[MessageProblem] | None = None, retry_after: int | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.problems, self.retry_after = status, error, problems or [], retry_after

    def response(self) -> web.Response:
        body: dict[str, Any] = {"success": False, "error": self.error}
        if self.problems:
            body["errors"] = [problem.as_json() for problem in self.problems]
        headers = dict(CORS_HEADERS)
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        response = web.Response(status=self.status, body=orjson.dumps(body), content_type="application/json", headers=headers)
        if self.status == 408:
            response.force_close()  # the rest of the body is not waited for
        return response


class IngestServer:
    """The request handling; `app()` gives the aiohttp application."""

    def __init__(
        self,
        *,
        sources: Mapping[str, str],
        topic: str,
        codec: AvroCodec,
        producer: AsyncProducer,
        max_in_flight: int,
        retry_after_s: int,
        request_timeout_s: float,
        body_timeout_s: float = BODY_TIMEOUT_S,
        lag: PipelineLag | None = None,
    ) -> None:
        self.sources = dict(sources)
        self.topic = topic
        self.codec = codec
        self.producer = producer
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.request_timeout_s = request_timeout_s
        self.body_timeout_s = body_timeout_s
        self.lag = lag  # backpressure: refuse while the pipeline lags past ingest.max_lag (topology/runtime/pipeline_lag.py)
        self.in_flight = 0
        self.responses: Counter[int] = Counter()
        self.events_accepted = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=2 * MAX_BATCH_BYTES, middlewares=[json_errors])
        app.router.add_post("/v1/{call}", self.handle)
        app.router.add_route("OPTIONS", "/v1/{call}", self.preflight)
        app.router.add_get("/v1/projects/{write_key}/settings", self.browser_settings)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=CORS_HEADERS)

    async def browser_settings(self, request: web.Request) -> web.Response:
        """What analytics.js (analytics-next) loads before sending: point it back at this host.

        Use it by setting the snippet's `cdnURL` (or `load(..., {cdnURL})`) to this host.
        """
        key = request.match_info["write_key"]
        if key not in self.sources:
            raise HttpError(404, "unknown write key")
        host = f"{request.host}/v1"
        body = {"integrations": {"Segment.io": {"apiKey": key, "apiHost": host, "protocol": request.scheme}}, "plan": {}}
        return web.json_response(body, headers={"Access-Control-Allow-Origin": "*"})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "in_flight": self.in_flight})

    async def metrics(self, request: web.Request) -> web.Response:
        responses = Metric("cdp_ingest_responses_total", "counter", "HTTP responses by status")
        for status, count in sorted(self.responses.items()):
            responses.add(count, status=str(status))
        return web.Response(text=render([
            Metric("cdp_ingest_events_total", "counter", "events acknowledged by Kafka and answered 200").add(self.events_accepted),
            Metric("cdp_ingest_events_in_flight", "gauge", "events waiting for Kafka's acknowledgement").add(self.in_flight),
            responses, *(self.lag.metrics() if self.lag else ()), process_cpu(),
        ]), content_type="text/plain")  # fmt: skip

    async def handle(self, request: web.Request) -> web.Response:
        call = request.match_info["call"]
        try:
            if call not in SINGLE_CALLS and call not in BATCH_CALLS:
                raise Rejected(404, f"unknown endpoint /v1/{call}")
            response = await self._accept(request, call)
        except Rejected as rejected:
            response = rejected.response()
        self.responses[response.status] += 1
        return response

    async def _accept(self, request: web.Request, call: str) -> web.Response:
        received_at = int(time.time() * 1000)
        is_batch = call in BATCH_CALLS
        body = await self._read_json(request, MAX_BATCH_BYTES if is_batch else MAX_EVENT_BYTES)
        source = self._authenticate(request, body)
        client_ip = _client_ip(request)
        if is_batch:
            events, problems = batch_to_raw_events(body, source=source, received_at=received_at, client_ip=client_ip)
            if problems:
                raise Rejected(400, "invalid batch: nothing was accepted", problems)
        else:
            try:
                events = [to_raw_event(body, call_type=SINGLE_CALLS[call], source=source, received_at=received_at, client_ip=client_ip)]
            except InvalidMessage as exc:
                raise Rejected(400, f"invalid {SINGLE_CALLS[call]} call", [MessageProblem(0, exc.field, exc.reason)]) from None
        if events and self.lag is not None and (lag := self.lag.refuses()) is not None:
            error = f"the pipeline is {lag} events behind the ingest, over ingest.max_lag ({self.lag.max_lag}); retry later"
            raise Rejected(429, error, retry_after=self.retry_after_s)
        if self.in_flight + len(events) > self.max_in_flight:
            raise Rejected(429, "too many events waiting for Kafka; retry later", retry_after=self.retry_after_s)
        records = [Record(self.topic, event["message_id"].encode(), self.codec.encode(event)) for event in events]
        self.in_flight += len(records)
        try:
            await asyncio.wait_for(self.producer.write_all(records), self.request_timeout_s)
        except (DeliveryFailed, asyncio.TimeoutError) as exc:
            raise Rejected(503, f"Kafka did not acknowledge the events; retry: {exc}", retry_after=self.retry_after_s) from None
        finally:
            self.in_flight -= len(records)
        self.events_accepted += len(records)
        return web.Response(body=b'{"success":true}', content_type="application/json", headers=CORS_HEADERS)

    async def _read_json(self, request: web.Request, limit: int) -> Any:
        """The parsed body; aiohttp inflates gzip bodies itself and stops reading at `client_max_size`."""
        try:
            data = await read_body(request, limit, self.body_timeout_s)
        except HttpError as exc:
            raise Rejected(exc.status, exc.body["error"]) from None
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise Rejected(400, "request body is not valid JSON", [MessageProblem(None, "body", str(exc))]) from None

    def _authenticate(self, request: web.Request, body: Any) -> str:
        """The source name of the request's write key: HTTP Basic user name first, then body.writeKey."""
        key = _basic_user(request.headers.get("Authorization", ""))
        if key is None and isinstance(body, dict) and isinstance(body.get("writeKey"), str):
            key = body["writeKey"]
        if not key:
            raise Rejected(401, "no write key: send it as the HTTP Basic user name or as writeKey in the body")
        source = self.sources.get(key)
        if source is None:
            raise Rejected(401, "unknown write key")
        return source


def _client_ip(request: web.Request) -> str | None:
    """The caller's address: the first X-Forwarded-For hop when behind a proxy, else the peer."""
    forwarded = request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
    return forwarded or request.remote


def _basic_user(header: str) -> str | None:
    if not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, ValueError):  # not base64 (ValueError: non-ASCII text), not UTF-8
        return None
    return decoded.split(":", 1)[0] or None
