"""Real HTTP receivers for the sync tests: an aiohttp server on its own thread and event loop, one path per
destination, each answering as the test tells it and keeping every request it got (headers, body, answer)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from tests.support import free_port

Answer = Callable[[int], tuple[int, str, dict[str, str]]]  # the path's request count (1-based) -> status, body, headers


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float = field(default_factory=time.time)  # when it was answered (epoch seconds)


@dataclass
class Receivers:
    answers: dict[str, Answer] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("the test receiver did not start")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def on(self, path: str, answer: Answer) -> None:
        self.answers[path] = answer

    def got(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/{path}", self._handle)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.Response:
        path, body = request.match_info["path"], await request.read()
        with self._lock:
            count = self._counts[path] = self._counts.get(path, 0) + 1
        status, text, headers = self.answers.get(path, lambda n: (200, "ok", {}))(count)
        with self._lock:
            self.received.append(Received(path, dict(request.headers), body, status))
        return web.Response(status=status, text=text, headers=headers)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

