"""Running the gateway under uvicorn."""

from __future__ import annotations

import logging
import socket
import sys

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from gateway.app import create_app
from gateway.protocol import HttpProtocol
from gateway.settings import GatewaySettings
from gateway.supervisor import Supervisor
from tokenrelay.config import ConfigError

# Open streams get this long to finish on shutdown; then they are cancelled, which publishes a
# cancel for each, so workers stop generating for clients that are gone.
GRACEFUL_SHUTDOWN_S = 5


def run(settings: GatewaySettings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.processes > 1:
        sys.exit(Supervisor(settings=settings).run())
    server = uvicorn.Server(uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # use the root logger set up above: one format for every line
        access_log=False,  # the app writes its own (gateway/accesslog.py)
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        lifespan="on",
        http=HttpProtocol,
    ))
    sockets = None
    if settings.reuse_port:
        if not hasattr(socket, "SO_REUSEPORT"):
            raise ConfigError("--reuse-port: this system has no SO_REUSEPORT")
        try:
            sockets = [_listen(settings)]
        except OSError as exc:  # as uvicorn says it when it binds
            logging.getLogger("uvicorn.error").error("could not bind %s:%d: %s", settings.host, settings.port, exc)
            sys.exit(STARTUP_FAILURE)
    server.run(sockets=sockets)
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def _listen(settings: GatewaySettings) -> socket.socket:
    """The listening socket, bound with SO_REUSEPORT (uvicorn's own binding has no such option)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((settings.host, settings.port))
    except OSError:
        sock.close()
        raise
    return sock
