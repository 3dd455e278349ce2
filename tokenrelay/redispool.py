"""A Redis connection pool that hands out an idle connection without a turn of the event loop.

redis-py's asyncio pool (5.3 and later; redis-py issue #3692) checks each connection it hands out
for unread data with a zero-timeout read, which takes a turn of the event loop, and does so under
one ``asyncio.Lock``. So each command waited a loop turn, plus one for every command queued
before it. On a loaded loop (the gateway writing tokens to 32 streams) a turn takes milliseconds:
the enqueue script reached Redis 4-8 ms (p50) after the gateway sent it, against 2-4 ms with
this pool (tiny model, 32 users; docs/benchmarks-notes.md).

Here taking a connection is synchronous, so atomic on the loop. An idle connected one is checked
without reading the socket: any reply that arrived since it was released is already in its
stream buffer, which the transport fills as data comes. A connection with data, or a closed
one, goes through redis-py's own check, which reconnects it.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection


class ConcurrentConnectionPool(ConnectionPool):
    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> AbstractConnection:
        connection: AbstractConnection = self.get_available_connection()  # type: ignore[no-untyped-call]
        try:
            if connection.is_connected and not _may_have_unread_data(connection):
                return connection
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    @classmethod
    def like(cls, pool: ConnectionPool) -> ConcurrentConnectionPool:
        """A pool with ``pool``'s connection settings (for arq's ``create_pool``, which builds a
        plain one)."""
        return cls(connection_class=pool.connection_class, max_connections=pool.max_connections,
                   **pool.connection_kwargs)


def _may_have_unread_data(connection: AbstractConnection) -> bool:
    """True unless the connection's buffers are known empty (unknown internals: True, so redis-py
    checks)."""
    stream = getattr(connection, "_reader", None)  # the asyncio.StreamReader under the parser
    buffered = getattr(stream, "_buffer", None)
    if stream is None or buffered is None or buffered or stream.at_eof():
        return True
    # hiredis keeps what it was fed but not yet parsed; the pure-Python parser reads the stream.
    hiredis_reader = getattr(getattr(connection, "_parser", None), "_reader", None)
    gets = getattr(hiredis_reader, "gets", None)
    return gets is not None and gets() is not False
