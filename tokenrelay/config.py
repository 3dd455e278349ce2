"""Strict command-line and environment parsing shared by every process.

Each option is a flag (``--max-batch-size``) that also reads ``TOKENRELAY_MAX_BATCH_SIZE``
(``REDIS_URL`` for the Redis URL). A flag given on the command line wins over the variable,
which wins over the default. A bad value is refused with a one-line message that names the flag
and where the value came from; nothing reads ``"0"`` or ``"false"`` as true.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlparse

ENV_PREFIX = "TOKENRELAY_"


class ConfigError(ValueError):
    """A refused setting; the message names the flag."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text.strip())
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ValueError(f"must be {bound}")
        return value

    return parse


def float_in(low: float, high: float | None = None) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text.strip())
        if value != value or value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ValueError(f"must be {bound}")
        return value

    return parse


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value not in allowed:
            raise ValueError(f"choose from {', '.join(allowed)}")
        return value

    return parse


def text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value.strip()


def redis_url(value: str) -> str:
    parsed = urlparse(value.strip())
    if parsed.scheme not in ("redis", "rediss", "unix") or not (parsed.hostname or parsed.path):
        raise ValueError("expected redis://host:port/db, rediss://... or unix://path")
    return value.strip()


@dataclass(frozen=True)
class Option:
    """One setting: ``--flag``, its variable, its parser and its default (None = unset)."""

    flag: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    env: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env_name(self) -> str:
        return self.env or ENV_PREFIX + self.dest.upper()


REDIS_URL = Option("--redis-url", redis_url, "redis://127.0.0.1:6379/0", "Redis URL", env="REDIS_URL")


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    for opt in options:
        # Values stay strings here; resolve() parses them, so flag and variable share one parser.
        parser.add_argument(
            opt.flag,
            dest=opt.dest,
            default=None,
            metavar=opt.dest.upper(),
            help=f"{opt.help} [env {opt.env_name}; default {opt.default}]",
        )


def resolve(
    options: Sequence[Option], given: Mapping[str, str | None], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Parse each option from the command line, else its variable, else its default."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for opt in options:
        raw = given.get(opt.dest)
        source = opt.flag
        if raw is None and opt.env_name in env and env[opt.env_name] != "":
            raw, source = env[opt.env_name], f"{opt.flag} (from {opt.env_name})"
        if raw is None:
            values[opt.dest] = opt.default
            continue
        try:
            values[opt.dest] = opt.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}: invalid value {raw!r}: {exc}") from None
    return values


def fail(program: str, error: ConfigError) -> NoReturn:
    print(f"{program}: {error}", file=sys.stderr)
    raise SystemExit(2)
