"""An in-process transport with fault injection, for tests.

Endpoints attached to one :class:`MemoryNetwork` talk through shared buffers instead of sockets.
Time passes only through ``anyio.current_time``/``anyio.sleep``, so trio's ``MockClock`` runs
latency and timeout scenarios instantly. It honours the contract of :mod:`distllm.transport.base`;
where a real network has choices, the model is:

- Dialing costs one round trip. A free address fails at once with ``ConnectError`` (like an ICMP
  port-unreachable); a partitioned one after ``connect_timeout`` (a black hole).
- Back-pressure: a stream's bytes in flight plus unread bytes are bounded by the sender's
  ``stream_send_window``; ``send`` waits for room. Opening a stream waits while the peer has
  ``max_incoming_streams`` of ours open.
- Latency delays each chunk, end-of-stream and reset by the one-way delay, keeping order.
- A connection across which nothing gets through (partition, killed peer) dies for each side
  ``dead_peer_timeout`` after the silence began; bytes that arrived before are still delivered.
- ``keepalive_interval`` and ``idle_timeout`` have no effect: silence is known exactly.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import Enum
from types import TracebackType
from typing import Self

import anyio
import anyio.abc
import anyio.lowlevel

from distllm.config import TransportConfig
from distllm.errors import ConnectError, PeerGone, PeerIdentityMismatch
from distllm.identity import Identity
from distllm.ids import PeerAddress, PeerID
from distllm.transport.base import Stream, StreamHandler

__all__ = ["EndpointStats", "MemoryEndpoint", "MemoryNetwork", "MemoryStream"]

logger = logging.getLogger("distllm.transport")

_FIRST_PORT = 20000
_DEFAULT_CONFIG = TransportConfig()


@dataclass(slots=True)
class EndpointStats:
    """Counters of one peer's endpoints (accumulated over restarts with the same identity)."""

    connections_dialed: int = 0
    streams_opened: int = 0
    streams_accepted: int = 0
    streams_closed: int = 0
    resets_sent: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def open_streams(self) -> int:
        """Streams opened or accepted and not yet closed: non-zero after a test means a leak."""
        return self.streams_opened + self.streams_accepted - self.streams_closed


class _Signal:
    """Wakes every task waiting on one buffer or connection; re-armed by each wait."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self, deadline: float) -> None:
        """Wait for a notification or until ``deadline``; the caller re-checks its condition."""
        if self._event is None:
            self._event = anyio.Event()
        event = self._event
        with anyio.CancelScope(deadline=deadline):
            await event.wait()


class _Pipe:
    """One direction of a stream: the bytes in flight or unread, and its end markers."""

    __slots__ = ("buffered", "chunks", "eof_at", "last_arrival", "reset_at", "signal", "stopped_at")

    def __init__(self) -> None:
        #: (arrival time, data); arrival times never decrease, so order is kept.
        self.chunks: deque[tuple[float, bytes]] = deque()
        #: Bytes in ``chunks``; the writer's send window bounds it.
        self.buffered = 0
        self.last_arrival = -math.inf
        #: The writer half-closed; the reader sees it from this time on.
        self.eof_at: float | None = None
        #: The writer reset the stream; from this time on the reader fails, unread data is lost.
        self.reset_at: float | None = None
        #: The reader closed its end: from this time on, writes fail.
        self.stopped_at: float | None = None
        self.signal = _Signal()

    def stamp(self, now: float, latency: float, sender: _Conn) -> float:
        """When something sent now arrives: never (until healed) while the sender is cut off."""
        if sender.silent_since is not None:
            sender.held.add(self)
            return math.inf
        self.last_arrival = max(now + latency, self.last_arrival)
        return self.last_arrival

    def signal_time(self, now: float, latency: float, sender: _Conn) -> float:
        """Like :meth:`stamp` for a control signal that does not queue behind data (STOP)."""
        if sender.silent_since is not None:
            sender.held.add(self)
            return math.inf
        return now + latency

    def release(self, arrival: float) -> None:
        """A partition healed: what was held back arrives at ``arrival``, in order."""
        self.chunks = deque((min(at, arrival), data) for at, data in self.chunks)
        self.last_arrival = min(self.last_arrival, arrival)
        if self.eof_at is not None:
            self.eof_at = min(self.eof_at, arrival)
        if self.reset_at is not None:
            self.reset_at = min(self.reset_at, arrival)
        if self.stopped_at is not None:
            self.stopped_at = min(self.stopped_at, arrival)
        self.signal.notify()


class _Conn:
    """One endpoint's view of a connection to one peer. ``peer`` is the other side's view."""

    def __init__(
        self,
        local: MemoryEndpoint,
        remote_id: PeerID,
        remote_address: tuple[str, int],
        signal: _Signal,
    ) -> None:
        self.local = local
        self.remote_id = remote_id
        self.remote_address = remote_address
        self.peer: _Conn = self
        self.streams: set[MemoryStream] = set()
        #: Streams the peer opened towards us that are still open here (its stream credit).
        self.incoming = 0
        self.error: PeerGone | None = None
        self.failed_at = math.inf
        #: Nothing gets through from this time on (partition or killed peer).
        self.silent_since: float | None = None
        #: Pipes holding what we sent while silent (arrival time infinite until healed).
        self.held: set[_Pipe] = set()
        #: The peer was killed: healing a partition cannot revive this connection.
        self.remote_dead = False
        #: Shared by both views: stream credit freed, connection failed.
        self.signal = signal

    def dead_at(self) -> float:
        if self.silent_since is None:
            return math.inf
        return self.silent_since + self.local.config.dead_peer_timeout

    def cutoff(self) -> float:
        """The latest arrival time that still gets through."""
        silent = math.inf if self.silent_since is None else self.silent_since
        return min(silent, self.failed_at)

    def failure(self, now: float) -> PeerGone | None:
        """The error this connection failed with (detecting silence lazily), or ``None``."""
        if self.error is None and now >= self.dead_at():
            timeout = self.local.config.dead_peer_timeout
            self.fail(PeerGone(f"nothing heard from {self.remote_id!r} for {timeout:g} s"), now)
        return self.error

    def go_silent(self, now: float) -> None:
        if self.error is None and self.silent_since is None:
            self.silent_since = now
            self.wake()

    def fail(self, error: PeerGone, now: float) -> None:
        if self.error is not None:
            return
        self.error = error
        self.failed_at = now
        self.local._forget(self)
        self.wake()

    def wake(self) -> None:
        self.signal.notify()
        for stream in list(self.streams):
            stream._wake()


class MemoryStream(Stream):
    """One end of an in-memory stream."""

    def __init__(self, conn: _Conn, outgoing: _Pipe, incoming: _Pipe, accepted: bool) -> None:
        self._conn = conn
        self._out = outgoing
        self._in = incoming
        self._accepted = accepted
        self._eof_sent = False
        self._closed = False

    @property
    def remote_peer(self) -> PeerID:
        return self._conn.remote_id

    @property
    def remote_address(self) -> tuple[str, int]:
        return self._conn.remote_address

    async def receive(self, max_bytes: int = 65536) -> bytes:
        # Checkpoint first; after it, data is taken without awaiting, so cancellation loses none.
        await anyio.lowlevel.checkpoint()
        pipe, conn = self._in, self._conn
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            now = anyio.current_time()
            error = conn.failure(now)
            cutoff = conn.cutoff()
            if pipe.reset_at is not None and pipe.reset_at <= min(now, cutoff):
                raise PeerGone(f"stream reset by {self.remote_peer!r}")
            wake = math.inf
            if pipe.chunks:
                arrival = pipe.chunks[0][0]
                if arrival <= min(now, cutoff):
                    return self._take(max_bytes)
                if arrival <= cutoff:
                    wake = arrival
            elif pipe.eof_at is not None and pipe.eof_at <= cutoff:
                if pipe.eof_at <= now:
                    raise anyio.EndOfStream
                wake = pipe.eof_at
            if error is not None:
                raise error
            if pipe.reset_at is not None and pipe.reset_at <= cutoff:
                wake = min(wake, pipe.reset_at)
            await pipe.signal.wait(min(wake, conn.dead_at()))

    def _take(self, max_bytes: int) -> bytes:
        pipe = self._in
        arrival, data = pipe.chunks.popleft()
        if len(data) > max_bytes:
            pipe.chunks.appendleft((arrival, data[max_bytes:]))
            data = data[:max_bytes]
        pipe.buffered -= len(data)
        self._conn.local.stats.bytes_received += len(data)
        pipe.signal.notify()  # the writer may have room again
        return data

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        if self._closed or self._eof_sent:
            raise anyio.ClosedResourceError
        data = bytes(item)  # the caller may reuse its buffer once we return
        window = self._conn.local.config.stream_send_window
        pos = 0
        while pos < len(data):
            room = await self._wait_for_room(window)
            piece = data[pos : pos + room]
            pos += len(piece)
            pipe = self._out
            now = anyio.current_time()
            pipe.chunks.append((pipe.stamp(now, self._latency(), self._conn), piece))
            pipe.buffered += len(piece)
            self._conn.local.stats.bytes_sent += len(piece)
            pipe.signal.notify()

    async def _wait_for_room(self, window: int) -> int:
        pipe, conn = self._out, self._conn
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            now = anyio.current_time()
            error = conn.failure(now)
            stopped_at = math.inf if pipe.stopped_at is None else pipe.stopped_at
            if stopped_at > conn.cutoff():
                stopped_at = math.inf  # the STOP never got through
            if stopped_at <= now:
                raise PeerGone(f"stream reset by {self.remote_peer!r}")
            if error is not None:
                raise error
            room = window - pipe.buffered
            if room > 0:
                return room
            await pipe.signal.wait(min(stopped_at, conn.dead_at()))

    async def send_eof(self) -> None:
        await anyio.lowlevel.checkpoint()
        if self._closed:
            raise anyio.ClosedResourceError
        if self._eof_sent:
            return
        now = anyio.current_time()
        error = self._conn.failure(now)
        if error is not None:
            raise error
        self._eof_sent = True
        self._out.eof_at = self._out.stamp(now, self._latency(), self._conn)
        self._out.signal.notify()

    async def aclose(self) -> None:
        # No await: this must complete inside cancelled scopes (handler teardown, finally blocks).
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        stats = conn.local.stats
        now = anyio.current_time()
        if conn.failure(now) is None:  # a dead connection carries no reset
            if not self._eof_sent:
                self._out.reset_at = self._out.stamp(now, self._latency(), conn)
                stats.resets_sent += 1
            if self._in.eof_at is None:
                self._in.stopped_at = self._in.signal_time(now, self._latency(), conn)
        self._in.chunks.clear()
        self._in.buffered = 0
        self._out.signal.notify()
        self._in.signal.notify()
        conn.streams.discard(self)
        if self._accepted:
            conn.incoming -= 1
            conn.signal.notify()
        stats.streams_closed += 1

    def _wake(self) -> None:
        self._out.signal.notify()
        self._in.signal.notify()

    def _latency(self) -> float:
        conn = self._conn
        return conn.local._network._latency(conn.local.peer_id, conn.remote_id)


class _State(Enum):
    NEW = "new"
    RUNNING = "running"
    KILLED = "killed"
    CLOSED = "closed"


class MemoryEndpoint:
    """An endpoint on a :class:`MemoryNetwork`; create it with :meth:`MemoryNetwork.endpoint`."""

    def __init__(
        self,
        network: MemoryNetwork,
        identity: Identity,
        config: TransportConfig,
        address: PeerAddress,
    ) -> None:
        self._network = network
        self._identity = identity
        self.config = config
        self._address = address
        self._handler: StreamHandler | None = None
        self._conns: dict[PeerID, _Conn] = {}
        self._task_group: anyio.abc.TaskGroup | None = None
        self._handler_scopes: set[anyio.CancelScope] = set()
        self._state = _State.NEW
        self.stats = network._stats_for(identity.peer_id)

    @property
    def peer_id(self) -> PeerID:
        return self._identity.peer_id

    @property
    def address(self) -> PeerAddress:
        return self._address

    @property
    def network(self) -> MemoryNetwork:
        return self._network

    async def __aenter__(self) -> Self:
        if self._state is not _State.NEW:
            raise RuntimeError("a MemoryEndpoint can be entered only once")
        self._network._register(self)
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        self._state = _State.RUNNING
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._state is _State.RUNNING:
            self._stop(PeerGone("endpoint closed"), PeerGone(f"{self.peer_id!r} closed"))
        self._state = _State.CLOSED
        assert self._task_group is not None  # entered
        self._task_group.cancel_scope.cancel()
        return await self._task_group.__aexit__(exc_type, exc, tb)

    def set_stream_handler(self, handler: StreamHandler | None) -> None:
        self._handler = handler

    def is_connected(self, peer_id: PeerID) -> bool:
        return self._live_conn(peer_id) is not None

    async def disconnect(self, peer_id: PeerID) -> None:
        await anyio.lowlevel.checkpoint()
        conn = self._live_conn(peer_id)
        if conn is not None:
            now = anyio.current_time()
            conn.fail(PeerGone(f"disconnected from {peer_id!r}"), now)
            conn.peer.fail(PeerGone(f"{self.peer_id!r} disconnected"), now)

    def _check_running(self) -> None:
        if self._state is _State.KILLED:
            # The process is gone as far as the network is concerned: to code still running
            # above the endpoint, that is a dead transport, not a misuse of a closed one.
            raise PeerGone("this endpoint was killed")
        if self._state is not _State.RUNNING:
            raise anyio.ClosedResourceError

    async def open_stream(self, peer: PeerAddress) -> MemoryStream:
        self._check_running()
        conn = self._live_conn(peer.peer_id)
        if conn is None:
            conn = await self._dial(peer)
        await anyio.lowlevel.checkpoint()
        while True:
            error = conn.failure(anyio.current_time())
            if error is not None:
                raise error
            remote = conn.peer
            if remote.incoming < remote.local.config.max_incoming_streams:
                break
            await conn.signal.wait(conn.dead_at())
        there, back = _Pipe(), _Pipe()
        ours = MemoryStream(conn, there, back, accepted=False)
        theirs = MemoryStream(remote, back, there, accepted=True)
        conn.streams.add(ours)
        remote.streams.add(theirs)
        remote.incoming += 1
        self.stats.streams_opened += 1
        remote.local.stats.streams_accepted += 1
        remote.local._accept(theirs)
        return ours

    async def _dial(self, peer: PeerAddress) -> _Conn:
        network = self._network
        latency = network._latency(self.peer_id, peer.peer_id)
        if network._partitioned(self.peer_id, peer.peer_id):
            await anyio.sleep(self.config.connect_timeout)
            raise ConnectError(f"no answer from {peer} within {self.config.connect_timeout:g} s")
        await anyio.sleep(2 * latency)  # the handshake's round trip
        self._check_running()
        conn = self._live_conn(peer.peer_id)  # another task may have connected meanwhile
        if conn is not None:
            return conn
        target = network._listener(peer.host, peer.port)
        if target is None:
            raise ConnectError(f"nothing listens at {peer.host}:{peer.port}")
        if target.peer_id != peer.peer_id:
            raise PeerIdentityMismatch(peer.peer_id, target.peer_id)
        if target is self:
            raise ConnectError("an endpoint cannot dial itself")
        existing = target._live_conn(self.peer_id)
        if existing is not None:  # the peer dialed us at the same moment: share its connection
            conn = existing.peer
            self._conns[peer.peer_id] = conn
            return conn
        signal = _Signal()
        conn = _Conn(self, peer.peer_id, target.address.socket_address, signal)
        conn.peer = _Conn(target, self.peer_id, self.address.socket_address, signal)
        conn.peer.peer = conn
        self._conns[peer.peer_id] = conn
        target._conns[self.peer_id] = conn.peer
        self.stats.connections_dialed += 1
        return conn

    def _accept(self, stream: MemoryStream) -> None:
        if self._state is _State.RUNNING:
            assert self._task_group is not None  # running
            self._task_group.start_soon(self._serve, stream)
        # Otherwise the process is gone: the opener notices the silence or the closed connection.

    async def _serve(self, stream: MemoryStream) -> None:
        with anyio.CancelScope() as scope:
            self._handler_scopes.add(scope)
            try:
                handler = self._handler
                if handler is not None and self._state is _State.RUNNING:
                    await handler(stream)
            except Exception:
                logger.exception("stream handler failed (stream from %r reset)", stream.remote_peer)
            finally:
                self._handler_scopes.discard(scope)
                await stream.aclose()

    def _live_conn(self, peer_id: PeerID) -> _Conn | None:
        conn = self._conns.get(peer_id)
        if conn is None or conn.failure(anyio.current_time()) is not None:
            return None
        return conn

    def _forget(self, conn: _Conn) -> None:
        if self._conns.get(conn.remote_id) is conn:
            del self._conns[conn.remote_id]

    def _stop(self, local_error: PeerGone, remote_error: PeerGone | None) -> None:
        """Drop off the network. Peers' connections fail with ``remote_error``, or go silent."""
        self._network._unregister(self)
        self._state = _State.KILLED
        now = anyio.current_time()
        for conn in list(self._conns.values()):
            conn.fail(local_error, now)
            if remote_error is not None:
                conn.peer.fail(remote_error, now)
            else:
                conn.peer.remote_dead = True
                conn.peer.go_silent(now)
        for scope in list(self._handler_scopes):
            scope.cancel()


class MemoryNetwork:
    """A simulated network of in-process endpoints, with faults injected by the test."""

    def __init__(self) -> None:
        self._next_port = _FIRST_PORT
        self._listening: dict[tuple[str, int], MemoryEndpoint] = {}
        self._running: dict[PeerID, MemoryEndpoint] = {}
        self._stats: dict[PeerID, EndpointStats] = {}
        self._default_latency = 0.0
        self._peer_latency: dict[PeerID, float] = {}
        self._pair_latency: dict[frozenset[PeerID], float] = {}
        self._partitions: list[tuple[frozenset[PeerID], frozenset[PeerID]]] = []

    def endpoint(
        self, identity: Identity, config: TransportConfig = _DEFAULT_CONFIG, host: str = "mem"
    ) -> MemoryEndpoint:
        """A new endpoint at ``host`` and a fresh port; it listens once entered."""
        port = self._next_port
        self._next_port += 1
        if self._next_port > 65535:
            self._next_port = _FIRST_PORT
        address = PeerAddress(identity.peer_id, host, port)
        return MemoryEndpoint(self, identity, config, address)

    # -- fault injection --------------------------------------------------------------------

    def kill(self, peer_id: PeerID, *, detect_immediately: bool = False) -> None:
        """The peer's process dies: its endpoint stops serving and its handlers are cancelled.

        Its peers' connections fail with ``PeerGone`` after their ``dead_peer_timeout`` (as a
        real peer would notice), or at once with ``detect_immediately``. Code running above the
        killed endpoint keeps running until its owner stops it; its transport calls fail.
        """
        endpoint = self._running.get(peer_id)
        if endpoint is None:
            raise KeyError(f"no running endpoint is {peer_id!r}")
        remote_error = PeerGone(f"{peer_id!r} died") if detect_immediately else None
        endpoint._stop(PeerGone("endpoint killed"), remote_error)

    def partition(self, a: Iterable[PeerID], b: Iterable[PeerID]) -> None:
        """Black-hole all traffic between groups ``a`` and ``b`` until :meth:`heal`.

        Their connections die after ``dead_peer_timeout``; new dials fail after
        ``connect_timeout``.
        """
        group_a, group_b = frozenset(a), frozenset(b)
        self._partitions.append((group_a, group_b))
        now = anyio.current_time()
        for endpoint in self._running.values():
            for conn in list(endpoint._conns.values()):
                if self._partitioned(endpoint.peer_id, conn.remote_id):
                    conn.go_silent(now)

    def heal(self) -> None:
        """Lift every partition. Connections not yet declared dead resume."""
        self._partitions.clear()
        now = anyio.current_time()
        for endpoint in list(self._running.values()):
            for conn in list(endpoint._conns.values()):
                if conn.silent_since is None or conn.remote_dead:
                    continue
                mine, theirs = conn.failure(now), conn.peer.failure(now)
                if mine is None and theirs is None:
                    latency = self._latency(endpoint.peer_id, conn.remote_id)
                    for side in (conn, conn.peer):
                        side.silent_since = None
                        for pipe in side.held:
                            pipe.release(now + latency)
                        side.held.clear()
                        side.wake()
                else:  # one side gave up: the other learns it as soon as packets flow again
                    conn.fail(mine or PeerGone(f"{conn.remote_id!r} dropped the connection"), now)

    def set_latency(self, seconds: float, a: PeerID | None = None, b: PeerID | None = None) -> None:
        """One-way delay of every chunk: between ``a`` and ``b``, on every link of ``a``, or
        (neither given) on every link without a more specific setting."""
        if seconds < 0:
            raise ValueError(f"latency must be >= 0, got {seconds!r}")
        if a is not None and b is not None:
            self._pair_latency[frozenset((a, b))] = seconds
        elif a is not None or b is not None:
            peer = a if a is not None else b
            assert peer is not None
            self._peer_latency[peer] = seconds
        else:
            self._default_latency = seconds

    # -- observation ------------------------------------------------------------------------

    def stats(self, peer_id: PeerID) -> EndpointStats:
        """A snapshot of the counters of ``peer_id``'s endpoints."""
        return replace(self._stats_for(peer_id))

    def open_streams(self) -> int:
        """Streams not yet closed, over all endpoints ever attached (0 = no leaks)."""
        return sum(stats.open_streams for stats in self._stats.values())

    # -- for endpoints ----------------------------------------------------------------------

    def _stats_for(self, peer_id: PeerID) -> EndpointStats:
        return self._stats.setdefault(peer_id, EndpointStats())

    def _register(self, endpoint: MemoryEndpoint) -> None:
        if endpoint.peer_id in self._running:
            raise ValueError(f"{endpoint.peer_id!r} already has a running endpoint")
        self._running[endpoint.peer_id] = endpoint
        self._listening[endpoint.address.socket_address] = endpoint

    def _unregister(self, endpoint: MemoryEndpoint) -> None:
        if self._running.get(endpoint.peer_id) is endpoint:
            del self._running[endpoint.peer_id]
        self._listening.pop(endpoint.address.socket_address, None)

    def _listener(self, host: str, port: int) -> MemoryEndpoint | None:
        return self._listening.get((host, port))

    def _partitioned(self, x: PeerID, y: PeerID) -> bool:
        return any((x in a and y in b) or (x in b and y in a) for a, b in self._partitions)

    def _latency(self, x: PeerID, y: PeerID) -> float:
        pair = self._pair_latency.get(frozenset((x, y)))
        if pair is not None:
            return pair
        if x in self._peer_latency or y in self._peer_latency:
            return max(self._peer_latency.get(x, 0.0), self._peer_latency.get(y, 0.0))
        return self._default_latency
