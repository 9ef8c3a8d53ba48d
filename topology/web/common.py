"""What the ingest and the workers' web servers share so that no request can make them answer 5xx or hang.

- Every error is JSON naming the problem (`{"error": ...}`): `json_errors` turns aiohttp's own plain-text
  answers (404 for an unknown path, 405 for a wrong method, 413) into that shape, and an unexpected exception
  into a logged 500 with a JSON body rather than a traceback page (none is expected: the fuzz test counts them).
- A request body is read within BODY_TIMEOUT_S and a size limit (`read_body`): a client that declares a length
  and then trickles bytes gets 408 and its connection closed, instead of holding it for as long as it likes.
- Secrets are compared as bytes in constant time (`same_secret`): a header is text that may hold any character.
- Requests aiohttp's HTTP parser refuses before any route sees them (a request line over 8 KB, malformed HTTP)
  are answered by aiohttp itself; `json_protocol_errors()` makes those answers JSON too (both servers call it).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

log = logging.getLogger(__name__)
BODY_TIMEOUT_S = 10.0  # the whole body must arrive within this after the headers
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpError(Exception):
    """An answer with an error status; `body` is its JSON (at least {"error": ...})."""

    def __init__(self, status: int, error: str, **extra: Any) -> None:
        super().__init__(error)
        self.status, self.body = status, {"error": error, **extra}

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(status=self.status, body=orjson.dumps(self.body), content_type="application/json", headers=headers)


async def read_body(request: web.Request, limit: int, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The request body (gzip inflated by aiohttp), or HttpError 400 (over `limit`, undecodable encoding) / 408."""
    if request.content_length is not None and request.content_length > limit:
        raise HttpError(400, f"request body is {request.content_length} bytes; the limit is {limit} bytes")
    try:
        data = await asyncio.wait_for(request.read(), timeout_s)
    except asyncio.TimeoutError:
        raise HttpError(408, f"the request body did not arrive within {timeout_s:.0f}s") from None
    except web.HTTPRequestEntityTooLarge:
        raise HttpError(400, f"request body is over the limit of {limit} bytes") from None
    except (HttpProcessingError, RequestPayloadError) as exc:  # e.g. a Content-Encoding: gzip body that is not gzip
        raise HttpError(400, f"request body could not be read: {exc}") from None
    if len(data) > limit:
        raise HttpError(400, f"request body is {len(data)} bytes; the limit is {limit} bytes")
    return data


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison of a header's text with a configured secret, as bytes (any character may come)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answer as JSON; a 408 also closes the connection (the rest of the body is not waited for)."""
    try:
        response = await handler(request)
    except HttpError as exc:
        response = exc.response()
    except web.HTTPException as exc:  # aiohttp's own: unknown path, wrong method, body too large
        if exc.status < 400:
            raise
        response = HttpError(exc.status, exc.reason or f"HTTP {exc.status}").response(headers=_kept(exc.headers))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug: say so in JSON, keep the details in the log
        log.exception("%s %s failed", request.method, request.path)
        response = HttpError(500, f"internal error ({type(exc).__name__}); see the server's log").response()
    if response.status == 408:
        response.force_close()
    return response


def json_protocol_errors() -> None:
    """Make the answers of aiohttp's own protocol handler (to requests it can't parse) JSON, like every other error.
    aiohttp has no setting for it: its `handle_error` is wrapped, once per process."""
    original = RequestHandler.handle_error
    if getattr(original, "json_errors", False):
        return

    def handle_error(self: RequestHandler, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:  # fmt: skip
        answer = original(self, request, status, exc, message)
        reason = (message or (exc and str(exc)) or f"HTTP {status}").replace("\n", " ")
        response = HttpError(status, reason[:300]).response()
        response.force_close()
        return response if isinstance(answer, web.Response) else answer

    handle_error.json_errors = True  # type: ignore[attr-defined]
    RequestHandler.handle_error = handle_error  # type: ignore[method-assign]


def _kept(headers: Any) -> dict[str, str]:
    """Headers of an aiohttp error worth keeping (Allow on a 405), not its text content type."""
    return {name: value for name, value in headers.items() if name.lower() == "allow"}
