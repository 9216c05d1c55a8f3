"""One async resource per running event loop, closed inside that loop when the loop shuts down.

An async connection pool belongs to the event loop it first ran in, and the trainer runs each
rollout in a fresh loop (asyncio.run): a pool kept across loops can neither be used nor closed
("Event loop is closed") in the next one, and a pool merely dropped leaks its sockets.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    """`get()` returns the running loop's resource, built by `create` on its first use there.

    A keeper task owns it: the task waits until the loop shuts down (asyncio.run and
    asyncio.Runner cancel leftover tasks and let them finish before closing the loop) and then
    awaits `close(resource)` there. `aclose()` closes the running loop's resource early.
    """

    def __init__(self, create: Callable[[], T], close: Callable[[T], Awaitable[None]], name: str):
        self._create = create
        self._close = close
        self._name = name
        self._resources: dict[asyncio.AbstractEventLoop, T] = {}
        self._keepers: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}
        self.created = 0

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        resource = self._resources.get(loop)
        if resource is None:
            for stale in [other for other in self._resources if other.is_closed()]:
                # A loop closed without cancelling its tasks: its resource cannot be awaited shut;
                # dropping it lets the garbage collector release the sockets.
                del self._resources[stale], self._keepers[stale]
            resource = self._resources[loop] = self._create()
            self.created += 1
            self._keepers[loop] = loop.create_task(self._close_when_cancelled(loop, resource),
                                                   name=f"{self._name}-keeper")
        return resource

    async def _close_when_cancelled(self, loop: asyncio.AbstractEventLoop, resource: T) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            if self._resources.get(loop) is resource:
                del self._resources[loop], self._keepers[loop]
            await self._close(resource)

    async def aclose(self) -> None:
        """Closes the running loop's resource (the next `get()` there builds a new one)."""
        keeper = self._keepers.get(asyncio.get_running_loop())
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
