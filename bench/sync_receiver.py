"""The webhook receiver of `cdp bench sync`, run as its own process: `python -m bench.sync_receiver PORT`.

POST /<anything>: a delivery (or `{"batch": [...]}` of them), answered 200; each item's arrival time is kept with
its payload's `timestamp` (the change's). GET /count: deliveries so far; GET /arrivals?since=N: [arrival s, change
ms] of those after the first N.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime

import orjson
from aiohttp import web

ARRIVALS: list[tuple[float, int]] = []


async def deliver(request: web.Request) -> web.Response:
    body, now = orjson.loads(await request.read()), time.time()
    for item in body.get("batch", [body]):
        ARRIVALS.append((now, int(datetime.fromisoformat(item["timestamp"]).timestamp() * 1000)))
    return web.Response(text="ok")


async def count(request: web.Request) -> web.Response:
    return web.Response(text=str(len(ARRIVALS)))


async def arrivals(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(ARRIVALS[int(request.query.get("since", "0")):]), content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_get("/count", count)
    app.router.add_get("/arrivals", arrivals)
    app.router.add_post("/{path}", deliver)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
