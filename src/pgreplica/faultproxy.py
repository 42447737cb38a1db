"""A fault-injecting TCP proxy for tests: put it between the application and a server
and switch network faults on and off while the application runs.

::

    with FaultProxy(("127.0.0.1", 5433)) as proxy:
        dsn = proxy.dsn(replica_dsn)        # the same DSN, through the proxy
        ...
        proxy.blackhole()                   # nothing answers any more, on any connection
        proxy.heal()

Faults (each stays until :meth:`FaultProxy.heal` or another call changes it):

* :meth:`~FaultProxy.delay`: every chunk of data waits ``seconds`` each way;
* :meth:`~FaultProxy.bandwidth`: at most ``bytes_per_second`` each way, per connection;
* :meth:`~FaultProxy.blackhole`: new connections are accepted and never answered, and
  established ones stop forwarding: a network partition (what is sent meanwhile is
  held, and flows again once healed, as TCP would retransmit it);
* :meth:`~FaultProxy.drop`: new connections are closed as soon as they are accepted;
* :meth:`~FaultProxy.reset`: every established connection is aborted (TCP RST), and
  with ``refuse=True`` new ones too until healed.

The proxy runs an asyncio event loop in a thread of its own, so that it serves sync and
asyncio applications alike and its controls can be called from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = ["FaultProxy"]

_CHUNK = 65536
_START_TIMEOUT = 5.0
_PARTITION_POLL = 0.01


class FaultProxy:
    """A TCP proxy from ``127.0.0.1:<port>`` to ``target`` with switchable faults."""

    def __init__(self, target: tuple[str, int], *, listen_host: str = "127.0.0.1") -> None:
        self.target = target
        self.listen_host = listen_host
        self.port = 0
        self._delay = 0.0
        self._rate: float | None = None
        self._blackhole = False
        self._refuse = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.accepted = 0
        """Connections accepted so far (for tests' assertions)."""

    def __repr__(self) -> str:
        host, port = self.target
        return f"<FaultProxy {self.listen_host}:{self.port} -> {host}:{port} {self.faults()}>"

    # -- life cycle -----------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve, self.listen_host, 0)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=main, name="pgreplica-fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(_START_TIMEOUT) or failure:
            self._thread = None
            raise RuntimeError(f"fault proxy did not start: {failure[0] if failure else 'timeout'}")
        return self

    def stop(self) -> None:
        """Close the listening socket and abort every connection."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._call(self._shutdown(), timeout=5)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        self._thread = self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def dsn(self, dsn: str) -> str:
        """``dsn`` with its host and port replaced by the proxy's."""
        params = conninfo_to_dict(dsn)
        params["host"] = self.listen_host
        params["port"] = str(self.port)
        params.pop("hostaddr", None)
        return make_conninfo(**params)  # type: ignore[arg-type]

    # -- faults ---------------------------------------------------------------------

    def delay(self, seconds: float) -> None:
        """Every chunk of data waits ``seconds`` before it is forwarded, each way."""
        if seconds < 0:
            raise ValueError(f"delay must be zero or more seconds, not {seconds}")
        self._delay = seconds

    def bandwidth(self, bytes_per_second: float | None) -> None:
        """At most ``bytes_per_second`` each way on each connection (None: no limit)."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError(f"bandwidth must be positive, not {bytes_per_second}")
        self._rate = bytes_per_second

    def blackhole(self) -> None:
        """A network partition: new connections are accepted but never answered, and
        established ones stop forwarding. What is sent meanwhile waits and flows again
        on :meth:`heal`, as TCP would retransmit it; :meth:`reset` breaks them instead."""
        self._blackhole = True

    def drop(self) -> None:
        """Close new connections as soon as they are accepted."""
        self._refuse = True

    def reset(self, *, refuse: bool = False) -> None:
        """Abort every established connection (TCP RST); with ``refuse``, new ones too
        until :meth:`heal`."""
        if refuse:
            self._refuse = True
        self._call(self._abort_all(), timeout=5)

    def heal(self) -> None:
        """No fault any more (connections broken meanwhile stay broken)."""
        self._delay, self._rate = 0.0, None
        self._blackhole = self._refuse = False

    def faults(self) -> dict[str, Any]:
        return {
            "delay": self._delay,
            "bandwidth": self._rate,
            "blackhole": self._blackhole,
            "refuse": self._refuse,
        }

    # -- the proxy ------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, None], *, timeout: float) -> None:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the fault proxy is not running")
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._abort_all()

    async def _abort_all(self) -> None:
        for writer in list(self._writers):
            _abort(writer)
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._refuse:
            _abort(writer)
            return
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            await self._partitioned()
            host, port = self.target
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), _START_TIMEOUT
                )
            except (OSError, asyncio.TimeoutError):
                _abort(writer)
                return
            upstream = up_writer
            self._writers.add(up_writer)
            await asyncio.gather(
                self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
            )
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._writers.discard(w)
                    with contextlib.suppress(Exception):
                        w.close()

    async def _partitioned(self) -> None:
        """Wait while the proxy is blackholed."""
        while self._blackhole:
            await asyncio.sleep(_PARTITION_POLL)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                await self._partitioned()  # held, not lost: the other side hears later
                if self._delay:
                    await asyncio.sleep(self._delay)
                rate = self._rate
                if rate:
                    await asyncio.sleep(len(data) / rate)
                await self._partitioned()
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                if writer.can_write_eof():
                    writer.write_eof()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
