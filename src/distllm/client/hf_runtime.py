"""The event loop behind the synchronous face: one daemon thread running anyio, reached through
a blocking portal.

``transformers`` calls ``forward`` synchronously; the client is async. A model created by
``from_pretrained`` starts one portal thread (``anyio.from_thread.start_blocking_portal``) and
its client inside it, and owns both: ``model.close()`` (or leaving ``with model:``) closes the
client, then stops the loop and joins the thread. There is no ``atexit`` hook and no ``__del__``:
the thread is a daemon, so a model that is never closed does not keep the interpreter alive.
A caller that runs its own loop (tests, an async application) lends its portal instead; the
model then closes nothing of it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager, ExitStack
from typing import TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

__all__ = ["Runtime"]

T = TypeVar("T")


class Runtime:
    """A portal into an event loop, and what was opened on it on the model's behalf."""

    def __init__(self, portal: BlockingPortal, stack: ExitStack | None = None) -> None:
        self.portal = portal
        # Closed in reverse: what was entered last (the client) closes before the loop stops.
        self._stack = stack if stack is not None else ExitStack()
        self.closed = False

    @classmethod
    def start(cls, backend: str = "asyncio") -> Runtime:
        """A new loop in a new daemon thread, owned by the returned runtime."""
        stack = ExitStack()
        portal = stack.enter_context(start_blocking_portal(backend, name="distllm-portal"))
        return cls(portal, stack)

    def call(self, func: Callable[[], Awaitable[T]]) -> T:
        """Run ``func()`` on the loop and wait for its result (from any other thread)."""
        self._require_open()
        return self.portal.call(func)

    def enter(self, stack: ExitStack, cm: AbstractAsyncContextManager[T]) -> T:
        """Enter ``cm`` on the loop; closing ``stack`` exits it.

        The exit is always a normal one: an error raised in the caller's thread is not thrown
        into the loop, where task groups would wrap it in an exception group -- it propagates
        here, as it was.
        """
        self._require_open()
        wrapped: AbstractContextManager[T] = self.portal.wrap_async_context_manager(cm)
        value = wrapped.__enter__()
        stack.callback(wrapped.__exit__, None, None, None)
        return value

    def keep(self, cm: AbstractAsyncContextManager[T]) -> T:
        """Enter ``cm`` on the loop until :meth:`close`."""
        return self.enter(self._stack, cm)

    def _require_open(self) -> None:
        if self.closed:
            raise RuntimeError("this model is closed")

    def close(self) -> None:
        """Exit what was kept, then stop the loop if this runtime started it. Idempotent."""
        if not self.closed:
            self.closed = True
            self._stack.close()
