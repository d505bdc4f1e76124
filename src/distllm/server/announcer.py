"""Keeps a server's announcement in the DHT: JOINING while loading, ONLINE while serving,
OFFLINE on a clean shutdown — re-stored every ``period`` with fresh load figures.

Records expire after ``ttl`` (a few periods), so a server that crashes simply vanishes from the
swarm view; nobody has to notice it. Expirations are wall-clock times (they travel between
machines), which is why this module reads ``time.time()`` rather than the event-loop clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

from distllm.dht.records import SignedEntry
from distllm.dht.schema import (
    ModelRecord,
    ServerRecord,
    ServerState,
    sign_model_record,
    sign_server_record,
)
from distllm.errors import DistllmError, LocalProtocolError
from distllm.identity import Identity

__all__ = ["Announcer", "EntryStore"]

logger = logging.getLogger("distllm.server.announcer")


class EntryStore(Protocol):
    """What the announcer needs from a DHT node."""

    async def store_many(self, entries: Sequence[SignedEntry]) -> list[int]: ...


RecordFactory = Callable[[ServerState], ServerRecord]


class Announcer:
    """Announces ``make_record(state)`` (and the model record) every ``period`` seconds."""

    def __init__(
        self,
        dht: EntryStore,
        identity: Identity,
        make_record: RecordFactory,
        *,
        model_record: ModelRecord | None = None,
        period: float = 30.0,
        ttl: float | None = None,
        store_timeout: float = 10.0,
    ) -> None:
        if not period > 0:
            raise ValueError(f"period must be > 0, got {period!r}")
        self._dht = dht
        self._identity = identity
        self._make_record = make_record
        self._model_record = model_record
        self.period = period
        self.ttl = ttl if ttl is not None else 3 * period
        if not self.ttl > period:
            raise ValueError(f"ttl must be > period, got {self.ttl!r}")
        self._store_timeout = store_timeout
        self._state = ServerState.JOINING
        self._wake = anyio.Event()
        self.announcements = 0  # successful rounds, for tests and logs

    @property
    def state(self) -> ServerState:
        return self._state

    def set_state(self, state: ServerState) -> None:
        """Switch state and announce it right away (from the running loop)."""
        self._state = state
        self._wake.set()

    async def switch(self, state: ServerState) -> None:
        """Switch state and announce it before returning (failures are logged, not raised)."""
        self._state = state
        await self._announce_logged()

    async def announce(self) -> int:
        """Store the current records once; returns the fewest replicas any entry reached."""
        expiration = time.time() + self.ttl
        record = self._make_record(self._state)
        entries = sign_server_record(self._identity, record, expiration)
        if self._model_record is not None:
            entries.append(sign_model_record(self._identity, self._model_record, expiration))
        with anyio.fail_after(self._store_timeout):
            replicas = await self._dht.store_many(entries)
        stored = min(replicas, default=0)
        if stored == 0:
            logger.warning("announcement of %s reached no DHT node", record.keys[0])
        self.announcements += 1
        return stored

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Announce now and every period until cancelled; then announce OFFLINE (shielded)."""
        task_status.started()
        try:
            while True:
                await self._announce_logged()
                self._wake = anyio.Event()
                with anyio.move_on_after(self.period):
                    await self._wake.wait()
        finally:
            await self._withdraw()

    async def _announce_logged(self) -> None:
        try:
            await self.announce()
        except* LocalProtocolError:
            raise  # our bug: surfaces, never retried
        except* (DistllmError, TimeoutError) as group:
            # The DHT being briefly unreachable must not stop serving; retry next period.
            # (``except*``: failures of concurrent stores arrive as an exception group.)
            logger.warning(
                "announcement failed (%s); retrying in %.0f s", group.exceptions[0], self.period
            )

    async def _withdraw(self) -> None:
        self._state = ServerState.OFFLINE
        with anyio.CancelScope(shield=True), anyio.move_on_after(min(3.0, self._store_timeout)):
            try:
                await self.announce()
            except* LocalProtocolError:
                raise
            except* (DistllmError, TimeoutError) as group:
                logger.info(
                    "could not announce OFFLINE (%s); the records will expire",
                    group.exceptions[0],
                )
