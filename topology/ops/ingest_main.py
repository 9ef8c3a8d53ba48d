"""`cdp ingest`: serve the HTTP ingest until SIGTERM/SIGINT, then flush what Kafka has not acknowledged yet.

With `ingest.max_lag` set, a thread reads the pipeline's lag from Kafka while it serves (topology/runtime/pipeline_lag.py)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from topology.config import Settings
from topology.graph import ingest_server
from topology.web.common import json_protocol_errors
from topology.runtime.producer import AsyncProducer, producer_config


def serve(settings: Settings) -> None:
    """Blocks; one process, one event loop, one Kafka producer."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # uvloop is a speed-up, not a requirement
        pass
    json_protocol_errors()
    producer = AsyncProducer(producer_config(settings.kafka_bootstrap, settings.ingest.delivery_timeout_ms))
    server = ingest_server(settings, producer)
    lag = server.lag
    assert lag is not None
    app = server.app()

    async def follow_lag(app: web.Application) -> None:
        if settings.ingest.max_lag:  # 0: no backpressure, so nothing to read
            lag.start()

    async def close(app: web.Application) -> None:
        await asyncio.to_thread(lag.stop)
        await asyncio.to_thread(producer.close, 30.0)

    app.on_startup.append(follow_lag)
    app.on_cleanup.append(close)
    logging.getLogger(__name__).info("ingest listening on %s:%d", settings.ingest_bind, settings.ingest_port)
    web.run_app(app, host=settings.ingest_bind, port=settings.ingest_port, reuse_port=True, access_log=None, print=None)
