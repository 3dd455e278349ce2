"""Running the gateway under uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from gateway.app import create_app
from gateway.protocol import HttpProtocol
from gateway.settings import GatewaySettings

# Open streams get this long to finish on shutdown; then they are cancelled, which publishes a
# cancel for each, so workers stop generating for clients that are gone.
GRACEFUL_SHUTDOWN_S = 5


def run(settings: GatewaySettings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # use the root logger set up above: one format for every line
        access_log=False,  # the app writes its own (gateway/accesslog.py)
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        lifespan="on",
        http=HttpProtocol,
    )
