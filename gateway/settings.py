"""The gateway's settings: flags, their variables, and the typed result."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenrelay import config
from tokenrelay.config import Option

OPTIONS: list[Option] = [
    config.REDIS_URL,
    Option("--host", config.text, "127.0.0.1", "address to listen on"),
    Option("--port", config.int_in(1, 65535), 8000, "port to listen on"),
    Option(
        "--processes",
        config.int_in(1, 64),
        1,
        "gateway processes to run, sharing the port (Linux; each with its own event loop; one that dies is restarted)",
    ),
    Option(
        "--reuse-port",
        config.parse_bool,
        False,
        "bind with SO_REUSEPORT (Linux), so that gateways started apart share the port (on/off)",
    ),
    Option(
        "--queue-timeout",
        config.float_in(0.1),
        60.0,
        "seconds a request may wait for a worker to start it before the gateway answers 503",
    ),
    Option(
        "--stream-keepalive",
        config.float_in(0.1),
        15.0,
        "seconds of silence after which a stream gets a ': ping' comment",
    ),
    Option(
        "--max-queue-length",
        config.int_in(0),
        1000,
        "requests that may wait in one model's queue; more get 429 (0: no limit)",
    ),
    Option(
        "--max-request-bytes",
        config.int_in(1024),
        8 * 1024 * 1024,
        "largest request body accepted; bigger ones get 413",
    ),
    Option(
        "--access-log",
        config.parse_bool,
        True,
        "one log line per request as it ends (on/off); off where a proxy in front logs them",
    ),
]


@dataclass(frozen=True)
class GatewaySettings:
    redis_url: str = config.REDIS_URL.default
    host: str = "127.0.0.1"
    port: int = 8000
    processes: int = 1
    reuse_port: bool = False
    queue_timeout: float = 60.0
    stream_keepalive: float = 15.0
    max_queue_length: int = 1000
    max_request_bytes: int = 8 * 1024 * 1024
    access_log: bool = True

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> GatewaySettings:
        """Build from what ``config.resolve(OPTIONS, ...)`` returns."""
        return cls(
            redis_url=str(values["redis_url"]),
            host=str(values["host"]),
            port=int(values["port"]),
            processes=int(values["processes"]),
            reuse_port=bool(values["reuse_port"]),
            queue_timeout=float(values["queue_timeout"]),
            stream_keepalive=float(values["stream_keepalive"]),
            max_queue_length=int(values["max_queue_length"]),
            max_request_bytes=int(values["max_request_bytes"]),
            access_log=bool(values["access_log"]),
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GatewaySettings:
        """Variables and defaults only; raises ``config.ConfigError`` on a bad value."""
        return cls.from_values(config.resolve(OPTIONS, {}, environ))

    def to_env(self) -> dict[str, str]:
        """These settings as the variables ``from_env`` reads back, for processes started afresh."""
        env = {}
        for option in OPTIONS:
            value = getattr(self, option.dest)
            env[option.env_name] = ("on" if value else "off") if isinstance(value, bool) else str(value)
        return env
