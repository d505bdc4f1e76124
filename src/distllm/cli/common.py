"""Helpers shared by the long-running commands (``dht``, ``serve``)."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

__all__ = ["concrete_host", "write_atomically"]

_WILDCARDS = {"0.0.0.0": socket.AF_INET, "::": socket.AF_INET6}


def concrete_host(host: str) -> str:
    """``host``, or for a wildcard this machine's primary IP (loopback if it has none)."""
    family = _WILDCARDS.get(host)
    if family is None:
        return host
    probe = ("10.255.255.255", 1) if family == socket.AF_INET else ("fd00::1", 1)
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(probe)  # UDP connect sends nothing; it picks the outgoing interface
            return str(sock.getsockname()[0])
    except OSError:
        return "127.0.0.1" if family == socket.AF_INET else "::1"


def write_atomically(path: Path, text: str) -> None:
    """Readers never see a half-written file: write a temporary one, then rename it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
