"""A pipelined Redis connection for the request path: the rate limiter's one call per batch.

Why not redis-py here (it serves everything else: keys, cache, placements, feedback): measured
on this project's 2-core machine, one ``EVALSHA`` through redis-py's asyncio client cost 166 µs
of CPU and 238 µs of wall time; through this connection 75 µs and 154 µs
(``python -m benchmarks.http_clients``, one run). At 2,500 requests/s that is a fifth of a core.
Replies are parsed by hiredis, the Redis project's C parser (which redis-py uses too); what is
written here is the command encoding, the FIFO of waiting replies and reconnection.

``RespConnection.from_url`` understands ``redis://`` and ``rediss://`` URLs with a user, a
password and a database number; for anything else (a unix socket, Sentinel) it returns None and
the caller keeps redis-py. A connection that fails or times out is closed (every waiting call
fails with ``ConnectionError``) and the next call opens a new one.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis


class RespError(Exception):
    """An error reply from Redis (``NOSCRIPT``, ``WRONGTYPE``, a Lua error, ...)."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(ConnectionError(f"Redis sent something unparsable: {exc}"))
                return
            if reply is False:
                return
            future = self.waiting.popleft()
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(RespError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.fail(ConnectionError(f"the Redis connection was lost ({exc or 'closed'})"))

    def fail(self, exc: Exception) -> None:
        self.lost = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


def encode(args: tuple[Any, ...]) -> bytes:
    """A command in RESP: ``*<n>`` then ``$<len> <bytes>`` per argument."""
    values = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    return b"*%d\r\n" % len(values) + b"".join(b"$%d\r\n%b\r\n" % (len(v), v) for v in values)


class RespConnection:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        timeout: float = 1.0,
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self._auth = (username, password)
        self._ssl = ssl.create_default_context() if tls else None
        self._timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._scripts: dict[str, str] = {}

    @classmethod
    def from_url(cls, url: str, timeout: float = 1.0) -> RespConnection | None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            return None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            return None
        return cls(
            parts.hostname,
            parts.port or 6379,
            db=int(path or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=parts.scheme == "rediss",
            timeout=timeout,
        )

    async def call(self, *args: Any) -> Any:
        """Send one command and return its reply; raises ``RespError`` for an error reply and
        ``ConnectionError`` (or ``TimeoutError``) when Redis cannot be reached in time."""
        protocol = self._protocol
        if protocol is None or protocol.lost:
            protocol = await self._connect()
        return await self._send(protocol, encode(args))

    async def script(self, source: str, keys: list[str], args: list[Any]) -> Any:
        """Run a Lua script by its SHA-1, loading it when Redis does not know it yet."""
        sha = self._scripts.get(source)
        if sha is None:
            sha = self._scripts[source] = hashlib.sha1(source.encode()).hexdigest()
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await self.call("EVAL", source, len(keys), *keys, *args)

    def _send(self, protocol: _Protocol, data: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        protocol.waiting.append(future)
        assert protocol.transport is not None
        protocol.transport.write(data)
        # a late reply would answer the wrong caller: time out the whole connection
        timer = loop.call_later(self._timeout, _expire, protocol, future)
        future.add_done_callback(lambda _: timer.cancel())
        return future

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and not self._protocol.lost:
                return self._protocol
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._timeout):
                    _, protocol = await loop.create_connection(
                        _Protocol,
                        self.host,
                        self.port,
                        ssl=self._ssl,
                        server_hostname=self.host if self._ssl else None,
                    )
                    username, password = self._auth
                    if password is not None:
                        auth = (username, password) if username else (password,)
                        await self._send(protocol, encode(("AUTH", *auth)))
                    if self.db:
                        await self._send(protocol, encode(("SELECT", self.db)))
            except (OSError, TimeoutError, RespError) as exc:
                raise ConnectionError(
                    f"cannot reach Redis at {self.host}:{self.port}: {exc}"
                ) from exc
            self._protocol = protocol
            return protocol

    async def aclose(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None


def _expire(protocol: _Protocol, future: asyncio.Future[Any]) -> None:
    if not future.done():
        protocol.fail(TimeoutError("Redis did not answer in time"))
