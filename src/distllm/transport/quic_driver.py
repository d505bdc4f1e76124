"""Moves datagrams and timers between the endpoint's UDP socket and its aioquic connections.

Three tasks, none of which needs a cancel scope per wake-up:

- the **receiver** waits until the socket is readable, drains up to ``_BATCH`` datagrams with
  ``recvfrom_into``, routes each by destination connection ID, applies the touched connections'
  events (waking readers and blocked senders), yields once so that the woken tasks reply - their
  replies carry our ACKs - and then flushes what is left;
- the **timer** sleeps until the earliest aioquic timer or the endpoint's tick. A flush only
  moves that deadline earlier (cheap), never cancels the sleep. It also sends the datagrams that
  found the kernel buffer full, waiting until the socket is writable;
- the **flusher** sends for connections with many open streams, once the tasks that are ready
  have written (see ``Connection.flush_soon``); otherwise application tasks flush inline.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

from distllm.transport.quic_conn import Connection
from distllm.transport.quic_socket import route_key

__all__ = ["Driver"]

_log = logging.getLogger("distllm.transport.quic")

#: Datagrams read per wake-up before the receiver yields (a loop that never yields starves ACKs).
_BATCH = 256
#: Largest UDP payload.
_RECV_BUFFER = 65536
#: Consecutive socket errors (ICMP reports and the like) tolerated within one batch.
_MAX_SOCKET_ERRORS = 16
#: Datagrams built per burst: each burst goes out before the next is built, so that the peer
#: can start on it (aioquic otherwise builds a whole congestion window first).
_BURST = 32
#: Delay of the ACK of a lone packet (aioquic's value, its timer granularity).
_ACK_DELAY = 0.001
#: How long queued datagrams wait for a writable socket before they are dropped (as if lost).
_BACKLOG_PATIENCE = 1.0

Address = tuple[Any, ...]
Datagrams = list[tuple[bytes, Address]]


class Driver:
    """The socket side of an endpoint: routing table, receive loop, timers, sending."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        on_unknown: Callable[[bytes, Address, float], None],
        on_tick: Callable[[float], None],
        tick: float,
        datagram_size: int,
    ) -> None:
        self.sock = sock
        #: Every live connection, and each of its connection IDs -> it.
        self.conns: set[Connection] = set()
        self.routes: dict[bytes, Connection] = {}
        self._on_unknown = on_unknown  # a long-header datagram for no known connection
        self._on_tick = on_tick
        self._tick = tick
        self._datagram_size = datagram_size
        self._burst_bytes = _BURST * datagram_size
        self._tick_at = 0.0
        self._timer_scope: anyio.CancelScope | None = None
        self._backlog: deque[tuple[bytes, Address]] = deque()
        self._view = memoryview(bytearray(_RECV_BUFFER))  # receive buffer
        self._drained = True
        self._dirty: dict[Connection, None] = {}
        self._dirty_event = anyio.Event()

    # -- table ---------------------------------------------------------------------------------

    def register(self, conn: Connection, cids: list[bytes]) -> None:
        self.conns.add(conn)
        for cid in cids:
            conn.cids.add(cid)
            self.routes[cid] = conn

    def unregister(self, conn: Connection) -> None:
        self.conns.discard(conn)
        for cid in conn.cids:
            self.remove_route(cid, conn)

    def add_route(self, cid: bytes, conn: Connection) -> None:
        self.routes[cid] = conn

    def remove_route(self, cid: bytes, conn: Connection) -> None:
        if self.routes.get(cid) is conn:
            del self.routes[cid]

    # -- sending -------------------------------------------------------------------------------

    def flush(self, conn: Connection) -> None:
        """Send what ``conn`` has to send now; bring the timer task's deadline forward if needed."""
        quic = conn.quic
        conn.flushes += 1
        now = anyio.current_time()
        burst = self._burst_bytes
        while True:
            datagrams = quic.datagrams_to_send_capped(now, burst)
            if not datagrams:
                break
            self.send(datagrams)
            if sum(len(data) for data, _ in datagrams) < burst - self._datagram_size:
                break
        self.timer_changed(conn, quic.get_timer())

    def schedule_flush(self, conn: Connection) -> None:
        """Flush ``conn`` once the tasks that are ready now have run."""
        dirty = self._dirty
        if conn not in dirty:
            dirty[conn] = None
            if len(dirty) == 1:
                self._dirty_event.set()

    async def run_flusher(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        while True:
            await self._dirty_event.wait()
            self._dirty_event = anyio.Event()
            dirty, self._dirty = self._dirty, {}
            for conn in dirty:
                if not conn.closed:
                    self.flush(conn)

    def timer_changed(self, conn: Connection, timer: float | None) -> None:
        conn.timer_at = timer
        scope = self._timer_scope
        if timer is not None and scope is not None and timer < scope.deadline:
            scope.deadline = timer

    def send(self, datagrams: Datagrams) -> None:
        sock = self.sock
        backlog = self._backlog
        for i, (data, addr) in enumerate(datagrams):
            if backlog:
                backlog.extend(datagrams[i:])
                return
            try:
                sock.sendto(data, addr)
            except BlockingIOError:
                backlog.extend(datagrams[i:])
                if self._timer_scope is not None:
                    self._timer_scope.deadline = -float("inf")  # wake the timer task now
                return
            except OSError as exc:  # unreachable network and the like: as if lost
                _log.debug("UDP send to %s failed: %s", addr, exc)

    async def _send_backlog(self) -> None:
        sock = self.sock
        backlog = self._backlog
        with anyio.move_on_after(_BACKLOG_PATIENCE):  # the kernel empties its buffer by itself
            while backlog:
                data, addr = backlog[0]
                try:
                    sock.sendto(data, addr)
                except BlockingIOError:
                    await anyio.wait_writable(sock)
                    continue
                except OSError as exc:
                    _log.debug("UDP send to %s failed: %s", addr, exc)
                backlog.popleft()
        if backlog:
            _log.warning("UDP socket not writable for %g s: %d datagrams dropped", 1, len(backlog))
            backlog.clear()

    # -- receiving -----------------------------------------------------------------------------

    async def run_receiver(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        sock = self.sock
        view = self._view
        task_status.started()
        while True:
            await anyio.wait_readable(sock)
            now = anyio.current_time()
            touched = self._receive_batch(view, now)
            for conn in touched:
                if not conn.closed:
                    conn.handle_events(now)
                    conn.wake_senders()
                    conn.quic.schedule_ack(now)  # due now: it rides on what the woken send
                    touched[conn] = conn.flushes
            await anyio.lowlevel.checkpoint()  # ... readers, handlers and senders, who run now
            now = anyio.current_time()
            for conn, flushes in touched.items():
                if conn.closed:
                    continue
                if conn.flushes != flushes:  # a woken task flushed it: everything went out
                    conn.unacked_datagrams = 0
                    continue
                if conn.unacked_datagrams < 2:  # a lone packet: aioquic's usual delay
                    conn.quic.schedule_ack(now + _ACK_DELAY)
                else:  # as TCP: at least every second packet
                    conn.unacked_datagrams = 0
                self.flush(conn)

    def poll(self, now: float) -> bool:
        """Read and apply what is queued on the socket right now, from any task; True if the
        socket was emptied. Before declaring a peer dead, make sure we are not just behind."""
        touched = self._receive_batch(self._view, now)
        for conn in touched:
            self.service(conn, now)
        return self._drained

    def _receive_batch(self, view: memoryview, now: float) -> dict[Connection, int]:
        sock = self.sock
        routes = self.routes
        touched: dict[Connection, int] = {}
        errors = 0
        self._drained = False
        for _ in range(_BATCH):
            try:
                size, addr = sock.recvfrom_into(view)
            except BlockingIOError:
                self._drained = True
                break
            except OSError as exc:  # e.g. an ICMP error reported on a still-usable socket
                errors += 1
                if errors > _MAX_SOCKET_ERRORS:
                    break
                _log.debug("UDP receive error ignored: %s", exc)
                continue
            if not size:
                continue
            data = view[:size].tobytes()
            cid = route_key(data)
            conn = routes.get(cid) if cid is not None else None
            if conn is None:
                if data[0] & 0x80:
                    self._on_unknown(data, addr, now)
                continue
            try:
                conn.receive(data, addr, now)
            except Exception:  # aioquic drops bad packets itself; never let one kill the loop
                _log.debug("datagram from %s dropped", addr, exc_info=True)
                continue
            touched[conn] = 0
        return touched

    def service(self, conn: Connection, now: float) -> None:
        """Apply ``conn``'s events, wake its blocked senders, send what it has to send."""
        if conn.closed:
            return
        conn.handle_events(now)
        if not conn.closed:
            conn.wake_senders()
            self.flush(conn)

    # -- timers --------------------------------------------------------------------------------

    async def run_timers(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        self._tick_at = anyio.current_time() + self._tick
        task_status.started()
        while True:
            if self._backlog:
                await self._send_backlog()
            with anyio.CancelScope(deadline=self._next_deadline()) as scope:
                self._timer_scope = scope
                await anyio.sleep_forever()
            self._timer_scope = None
            now = anyio.current_time()
            for conn in [c for c in self.conns if c.timer_at is not None and c.timer_at <= now]:
                if not conn.closed:
                    conn.unacked_datagrams = 0  # a delayed ACK is what fires most
                    conn.quic.handle_timer(now)
                    self.service(conn, now)
            if now >= self._tick_at:
                self._tick_at = now + self._tick
                self._on_tick(now)

    def _next_deadline(self) -> float:
        deadline = self._tick_at
        for conn in self.conns:
            timer = conn.timer_at
            if timer is not None and timer < deadline:
                deadline = timer
        return deadline
