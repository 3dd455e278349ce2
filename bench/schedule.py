"""Command-line shapes shared by the benchmarks: concurrency lists and requests-per-user schedules."""

from __future__ import annotations

import argparse


def users_list(text: str) -> list[int]:
    """``"1,4,8"`` -> ``[1, 4, 8]``."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be positive")
    return values


class PerUsers:
    """Requests per user, as one number (``"2"``) or per concurrency (``"1:3,32:2,64:1"``).

    With a per-concurrency list, a level not named uses the entry of the nearest level below it
    (or the first entry).
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.table: dict[int, int] = {}
        try:
            if ":" not in text:
                self.table = {1: int(text)}
            else:
                for part in text.split(","):
                    users, count = part.split(":")
                    self.table[int(users)] = int(count)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected N or USERS:N,... got {text!r}") from None
        if not self.table or min(self.table.values()) < 1:
            raise argparse.ArgumentTypeError("requests per user must be positive")

    def __call__(self, users: int) -> int:
        below = [u for u in self.table if u <= users]
        return self.table[max(below)] if below else self.table[min(self.table)]

    def __str__(self) -> str:
        return self.text


def add_requests_per_user(parser: argparse.ArgumentParser, default: str) -> None:
    """The ``--requests-per-user`` option every benchmark takes."""
    parser.add_argument(
        "--requests-per-user",
        type=PerUsers,
        default=PerUsers(default),
        help="N, or per concurrency USERS:N,... (a level uses the nearest entry at or below it)",
    )
