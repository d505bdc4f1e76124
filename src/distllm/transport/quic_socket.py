"""The endpoint's one UDP socket: a raw non-blocking ``socket.socket``.

The driver waits for readability once and then drains many datagrams with ``recvfrom_into``;
awaiting once per datagram through a socket object costs several times more CPU per packet.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any

import anyio

__all__ = ["is_loopback", "open_udp_socket", "resolve", "route_key"]

_log = logging.getLogger("distllm.transport.quic")

#: The connection ID length of every distllm endpoint (short headers do not carry it).
CID_LENGTH = 8


async def open_udp_socket(host: str, port: int, buffer_bytes: int) -> socket.socket:
    """A bound, non-blocking UDP socket for ``host`` (IPv4 or IPv6) with big kernel buffers."""
    infos = await _getaddrinfo(host, port, 0, socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for force, plain in (
            (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
            (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF),
        ):
            _set_buffer(sock, force, plain, buffer_bytes)
        sock.bind(sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _set_buffer(sock: socket.socket, force: int | None, plain: int, size: int) -> None:
    # The FORCE variants pass rmem_max/wmem_max when we may (root); otherwise the kernel caps.
    for option in (force, plain):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError:
            continue
        return
    _log.debug("could not set UDP socket buffer %d to %d bytes", plain, size)


async def resolve(sock: socket.socket, host: str, port: int) -> tuple[Any, ...]:
    """The socket address for ``host:port`` in the form ``recvfrom`` reports it.

    aioquic compares a server's address with each datagram's source, so the forms must match.
    """
    family = sock.family
    flags = socket.AI_V4MAPPED if family == socket.AF_INET6 else 0
    infos = await _getaddrinfo(host, port, family, flags)
    return tuple(infos[0][4])


async def _getaddrinfo(host: str, port: int, family: int, flags: int) -> list[tuple[Any, ...]]:
    infos: list[tuple[Any, ...]]
    try:  # numeric hosts resolve at once, without the resolver thread
        infos = socket.getaddrinfo(
            host, port, family, socket.SOCK_DGRAM, 0, flags | socket.AI_NUMERICHOST
        )
    except socket.gaierror:
        infos = await anyio.getaddrinfo(
            host, port, family=family, type=socket.SOCK_DGRAM, flags=flags
        )
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    return infos


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a numeric address, as sockets report peers) is this machine's
    loopback: 127.0.0.0/8, ::1, or an IPv4-mapped loopback."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def route_key(data: bytes) -> bytes | None:
    """The destination connection ID of a QUIC datagram, or None if it cannot be one."""
    if data[0] & 0x80:  # long header: version (4 bytes), then a length-prefixed DCID
        if len(data) < 7:
            return None
        return data[6 : 6 + data[5]]
    return data[1 : 1 + CID_LENGTH]
