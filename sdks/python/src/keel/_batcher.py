"""Outcomes reported together: many jobs' completions (or failures) in one request.

A worker running many short jobs would otherwise send one request per job. The server writes
a batch through the same group commit as its own workers' outcomes, so one request for the
outcomes that finish within ``window`` of the first is both cheaper for the server and
faster for the worker. Each submitter still gets its own item's answer.

The batcher is bounded: at most ``limit`` items wait for their answer (queued, or in a
request the server has not answered). A worker hands a finished job's outcome over and
frees the job's slot at once, so without a bound a server slower than the handlers would
let finished jobs pile up, each a lease the worker must keep renewing; with one, the next
:meth:`Batcher.submit` waits, and so does the slot that called it (backpressure).
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Generic, List, Optional, Set, Tuple, TypeVar

from ._protocol import MAX_BATCH
from .errors import KeelError
from .models import OutcomeResult

ItemT = TypeVar("ItemT")

Send = Callable[[List[ItemT]], Awaitable[List[OutcomeResult]]]


class Batcher(Generic[ItemT]):
    """Collects items for at most ``window`` seconds after the first, then sends them in one
    call (at most :data:`MAX_BATCH` per call), with at most ``limit`` items unanswered at a
    time. Must be created and used on one event loop."""

    def __init__(self, send: "Send[ItemT]", window: float, limit: int = MAX_BATCH) -> None:
        if limit < 1:
            raise ValueError("a batcher must accept at least one item")
        self._send = send
        self._window = window
        self._limit = limit
        self._pending: List[Tuple[ItemT, "asyncio.Future[OutcomeResult]"]] = []
        self._timer: Optional[asyncio.Handle] = None
        self._inflight: Set["asyncio.Task[None]"] = set()
        #: Items submitted whose request has not answered yet (pending or in flight).
        self._unanswered = 0
        #: Set whenever a request answered, so room may have opened.
        self._answered = asyncio.Event()

    @property
    def unanswered(self) -> int:
        """Items submitted and not answered yet."""
        return self._unanswered

    async def submit(self, item: ItemT) -> "asyncio.Future[OutcomeResult]":
        """Queues ``item`` once fewer than ``limit`` items are unanswered, and returns the
        future of its answer: its own result, or what the whole request raised (a
        :class:`keel.TransportError`, a ``5xx``…)."""
        while self._unanswered >= self._limit:
            self._answered.clear()
            await self._answered.wait()
        loop = asyncio.get_running_loop()
        fut: "asyncio.Future[OutcomeResult]" = loop.create_future()
        self._pending.append((item, fut))
        self._unanswered += 1
        if len(self._pending) >= MAX_BATCH:
            self.flush()
        elif self._timer is None:
            # A window of 0 still gathers everything submitted in the same loop iteration.
            if self._window > 0:
                self._timer = loop.call_later(self._window, self.flush)
            else:
                self._timer = loop.call_soon(self.flush)
        return fut

    def flush(self) -> None:
        """Sends what is pending now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            task = asyncio.get_running_loop().create_task(self._deliver(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def drain(self) -> None:
        """Sends what is pending and waits for every request in flight."""
        self.flush()
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

    async def _deliver(self, batch: List[Tuple[ItemT, "asyncio.Future[OutcomeResult]"]]) -> None:
        try:
            results = await self._send([item for item, _ in batch])
            if len(results) != len(batch):
                raise KeelError(
                    f"the server answered {len(results)} results for {len(batch)} outcomes"
                )
        except Exception as e:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        except BaseException:
            for _, fut in batch:
                fut.cancel()
            raise
        finally:
            self._unanswered -= len(batch)
            self._answered.set()
        for (_, fut), result in zip(batch, results):
            if not fut.done():
                fut.set_result(result)
