"""The engine behind :class:`keel.Worker`: one run's pollers, buffer, jobs, heartbeats and
reports.

Everything here lives on the worker's event loop, so its counters need no lock; the only
way in from another thread is :meth:`Run.request_stop_threadsafe`. See
:mod:`keel.worker` for the protocol it follows.

A job's life here: leased by a poller into :attr:`Run.buffer` (prefetch), started on a
free slot (:attr:`Run.active` counts the slots in use), its handler run, its outcome handed
to a :class:`~keel._batcher.Batcher`, which frees the slot, then acknowledged by the
server. From lease to acknowledgement the job is in :attr:`Run.held` and heartbeated, so
neither a buffered job nor one whose outcome is still on its way loses its lease.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import logging
from dataclasses import dataclass
from typing import (
    Any,
    Awaitable,
    Callable,
    Coroutine,
    Deque,
    Dict,
    List,
    Mapping,
    Optional,
    Set,
    Tuple,
)

from ._backoff import Backoff
from ._batcher import Batcher
from ._config import ClientConfig
from ._pace import Pace
from ._protocol import MAX_BATCH, Completion, Failure
from ._threads import DaemonPool
from .aio import AsyncClient
from .context import Context
from .errors import KeelError, PermanentError, RetryIn, TransportError
from .models import Job

#: A handler: ``fn(ctx, args)``, plain or ``async def``. Its return value (any JSON) is the
#: job's result.
Handler = Callable[[Context, Any], Any]

#: Most kinds a lease may filter on; with more handlers the filter is left out.
_MAX_KINDS = 100
#: After the grace period, how long outcomes already on their way still get to arrive.
_FINAL_FLUSH = 10.0
#: How much longer than its wait a long poll may take to answer before a stopping worker
#: gives up on it (a server that does not answer at all).
_POLL_SLACK = 5.0
#: With prefetch off, how long a busy worker waits for half its slots to free before
#: leasing (see reserve).
_GATHER = 0.002
#: Outcomes of each kind (completions, failures) that may wait for the server's answer at
#: once: one full request's worth. Beyond that a finished job keeps its slot until there is
#: room (backpressure), so a slow server cannot make finished jobs pile up.
_UNANSWERED_OUTCOMES = MAX_BATCH


def _transient(e: KeelError) -> bool:
    """Whether trying the same request again later may succeed."""
    return isinstance(e, TransportError) or e.status in (408, 425, 429) or (e.status or 0) >= 500


@dataclass(frozen=True)
class Registered:
    fn: Handler
    is_async: bool


@dataclass
class Outcome:
    """What a handler's run came to, before it is reported."""

    complete: bool
    result: Any = None
    error: str = ""
    permanent: bool = False
    retry_in: Optional[float] = None

    @classmethod
    def failure(
        cls, error: str, *, permanent: bool = False, retry_in: Optional[float] = None
    ) -> "Outcome":
        return cls(False, error=error, permanent=permanent, retry_in=retry_in)


class _Held:
    """One job whose lease this worker holds: buffered, running, or with its outcome on its
    way, until the server acknowledged it (or the job was released or lost)."""

    def __init__(self, job: Job, token: str, lease_until: float) -> None:
        self.job = job
        self.token = token
        self.ctx = Context(job, logging.getLogger("keel.job"))
        #: Loop time by which the lease lapses unless renewed.
        self.lease_until = lease_until
        #: Why the job is no longer ours ("cancelled", "lease lost", "released"), if it isn't.
        self.gone: Optional[str] = None
        #: True while in the buffer, waiting for a slot.
        self.buffered = True
        #: True while it holds a slot: from its start until its outcome is handed over.
        self.slot = False
        #: True while the handler runs; False once its outcome is being reported.
        self.in_handler = False
        #: The run: from the start on a slot to the acknowledged outcome.
        self.task: Optional["asyncio.Task[None]"] = None
        #: Renews the lease from the lease to the end, whether buffered or running.
        self.heartbeats: Optional["asyncio.Task[None]"] = None


@dataclass(frozen=True)
class Settings:
    """A worker's validated settings and handlers, fixed for one run."""

    config: ClientConfig
    queues: Tuple[str, ...]
    concurrency: int
    lease: float
    heartbeat_interval: float
    grace: float
    batch_window: float
    poll_wait: float
    worker_id: str
    handlers: Mapping[str, "Registered"]
    #: Most jobs held beyond the slots (0: lease only for free slots).
    prefetch: int


class Run:
    """The state of one run, all of it owned by the worker's event loop."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        s = settings
        self.s = s
        self.loop = loop
        self.log = logging.getLogger("keel.worker")
        self.client = AsyncClient._from_config(
            s.config, max_connections=s.concurrency + len(s.queues) + 8
        )
        self.pool = DaemonPool(s.concurrency, name=f"keel-{s.worker_id}")
        self.kinds: Optional[List[str]] = (
            list(s.handlers) if len(s.handlers) <= _MAX_KINDS else None
        )
        #: Every job whose lease is held, by id.
        self.held: Dict[str, _Held] = {}
        #: Leased jobs waiting for a slot, oldest first.
        self.buffer: Deque[_Held] = collections.deque()
        self.active = 0  # slots in use: a handler runs, or its outcome waits to be handed over
        self.reserved = 0  # room promised to a lease request in flight
        self.pace = Pace(s.prefetch, loop.time)
        self.waiting_pollers = 0
        self.polls_in_flight = 0
        self.capacity = asyncio.Event()  # set whenever room may have opened
        self.idle = asyncio.Event()  # set while no lease is held
        self.idle.set()
        self.stop_event = asyncio.Event()
        self.hurry_event = asyncio.Event()
        self.stopping = False
        self.background: Set["asyncio.Task[Any]"] = set()
        self.completer: Batcher[Completion] = Batcher(
            self.client.complete_many, s.batch_window, _UNANSWERED_OUTCOMES
        )
        self.failer: Batcher[Failure] = Batcher(
            self.client.fail_many, s.batch_window, _UNANSWERED_OUTCOMES
        )

    # -- control --------------------------------------------------------------------------

    def request_stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_event.set()
            self.capacity.set()

    def request_stop_threadsafe(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.request_stop)
        except RuntimeError:
            pass  # the loop already closed: the run is over

    def hurry(self) -> None:
        self.request_stop()
        self.hurry_event.set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = self.loop.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # -- main -----------------------------------------------------------------------------

    async def main(self) -> None:
        s = self.s
        self.log.info(
            "worker %s started: queues %s, concurrency %d, prefetch up to %d, kinds %s",
            s.worker_id,
            ",".join(s.queues),
            s.concurrency,
            s.prefetch,
            ",".join(s.handlers),
        )
        pollers = [self.loop.create_task(self.poll(q)) for q in s.queues]
        try:
            await self.stop_event.wait()
            await self.drain(pollers)
        finally:
            for t in pollers:
                t.cancel()
            await asyncio.gather(*pollers, return_exceptions=True)
            await self.client.close()
            self.pool.shutdown()
        self.log.info("worker %s stopped", s.worker_id)

    async def drain(self, pollers: List["asyncio.Task[None]"]) -> None:
        """The graceful stop, once ``stopping`` is set.

        Buffered jobs no slot started are released at once (no attempt used), so another
        worker can run them while this one's running jobs finish. No lease request starts
        any more, but a long poll already in flight is waited for (at most ``poll_wait``)
        rather than abandoned: the server may lease jobs to it until it answers, and jobs
        leased to a connection just closed would sit until their lease lapsed, then run
        again with an attempt used. Whatever the poll brings is released unrun. Running
        jobs get the grace period; those still running after it are released.
        :meth:`hurry` cuts both waits short.
        """
        s = self.s
        buffered = list(self.buffer)
        self.buffer.clear()
        for h in buffered:
            h.buffered = False
        self.log.info(
            "stopping: no new leases; %d running job(s) get up to %gs to finish",
            self.active,
            s.grace,
        )
        if buffered:
            self.log.info("releasing %d buffered job(s) that no slot started", len(buffered))
            self.spawn(self.release_held(buffered))
        if self.polls_in_flight:
            self.log.info(
                "waiting for %d long poll(s) in flight to answer (at most %gs); jobs they "
                "bring are given back unrun",
                self.polls_in_flight,
                s.poll_wait,
            )

        async def settled() -> None:
            if pollers:
                await asyncio.wait(pollers)  # unlike gather, never cancels them
            await self.idle.wait()

        await _first(settled(), self.hurry_event.wait(), timeout=s.grace)
        polling = [t for t in pollers if not t.done()]
        if polling:
            # Hurried (a second signal), the polls are abandoned at once: Keel drops a
            # waiting lease whose client went away, so only a poll answered in the same
            # instant can leave a job behind, which is rescued once its lease lapses.
            await _first(
                asyncio.wait(polling), self.hurry_event.wait(), timeout=s.poll_wait + _POLL_SLACK
            )
            stuck = [t for t in polling if not t.done()]
            if stuck:
                self.log.warning(
                    "abandoning %d long poll(s) in flight; a job leased to one just now runs "
                    "again once its lease lapses",
                    len(stuck),
                )
                for t in stuck:
                    t.cancel()
                await asyncio.gather(*stuck, return_exceptions=True)
        await self.abandon()
        # Outcomes on their way, and releases, get a last chance to arrive.
        self.completer.flush()
        self.failer.flush()
        await _first(self.idle.wait(), timeout=_FINAL_FLUSH)
        leftover = [h.task for h in self.held.values() if h.task is not None]
        for t in leftover:
            t.cancel()
        await asyncio.gather(*leftover, return_exceptions=True)
        for t in list(self.background):
            t.cancel()
        await asyncio.gather(*list(self.background), return_exceptions=True)
        for h in list(self.held.values()):
            self.forget(h)

    async def abandon(self) -> None:
        """After the grace period: release every job whose handler still runs."""
        stuck = [h for h in self.held.values() if h.in_handler]
        if not stuck:
            return
        # Jobs already cancelled or lost are no longer ours to release.
        mine = [h for h in stuck if h.gone is None]
        self.log.warning("releasing %d job(s) whose handler is still running", len(mine))
        for h in mine:
            h.gone = "released"
        await asyncio.gather(*(self.release(h.job, h.token) for h in mine))
        for h in stuck:
            h.ctx._cancel("shutdown")
            if h.task is not None:
                # An async handler is cancelled; a thread cannot be, and finishes unheard.
                h.task.cancel()
        await asyncio.gather(*(h.task for h in stuck if h.task is not None), return_exceptions=True)

    async def release_held(self, held: List[_Held]) -> None:
        """Gives back jobs no slot started; each lease is heartbeated until its release
        answers, then forgotten."""

        async def one(h: _Held) -> None:
            try:
                if h.gone is None:
                    h.gone = "released"
                    await self.release(h.job, h.token)
            finally:
                self.forget(h)

        await asyncio.gather(*(one(h) for h in held))

    async def release(self, job: Job, token: str) -> None:
        backoff = Backoff(base=0.1, cap=1.0)
        for attempt in range(3):
            try:
                await self.client.release(job.id, token)
                self.log.info("released job %s (%s) unrun", job.id, job.kind)
                return
            except KeelError as e:
                if _transient(e) and attempt < 2:
                    await asyncio.sleep(backoff.next())
                    continue
                if e.status == 409:
                    self.log.info("job %s was not released: %s", job.id, e.detail)
                else:
                    self.log.warning(
                        "could not release job %s (%s); it runs again once its lease lapses",
                        job.id,
                        e,
                    )
                return

    # -- leasing --------------------------------------------------------------------------

    def room(self) -> Tuple[int, int]:
        """``(room, capacity)``: how many more jobs may be leased now, and how many may be
        held at most (slots + prefetch), counting both running and buffered jobs."""
        self.pace.started(0)  # closes a start-rate window that ran out
        capacity = self.s.concurrency + self.pace.prefetch()
        return capacity - self.active - len(self.buffer) - self.reserved, capacity

    async def reserve(self) -> int:
        """Waits for room and promises some to one lease request (0: stopping).

        With jobs buffered, it waits until half the prefetch was taken, so a busy worker
        leases in batches rather than one job per finished job while the rest of the buffer
        still covers the round trip; with none buffered
        it leases at once, since a slot is idle or about to be. With prefetch off (no
        buffer), a busy worker instead waits up to ``_GATHER`` for half its slots, as
        keel-client's Rust worker does. With several queues, the room is shared among the
        pollers waiting for it, so one queue's idle long poll cannot hold all of it while
        another has work.
        """
        self.waiting_pollers += 1
        try:
            gather_until: Optional[float] = None
            while True:
                if self.stopping:
                    return 0
                room, capacity = self.room()
                wait: Optional[float] = None  # None: until capacity is set, however long
                if room <= 0:
                    pass
                elif self.s.prefetch == 0:
                    now = self.loop.time()
                    if gather_until is None:
                        gather_until = now + _GATHER
                    if room >= max(1, self.s.concurrency // 2) or now >= gather_until:
                        break
                    wait = gather_until - now
                elif not self.buffer or room >= max(1, (capacity - self.s.concurrency) // 2):
                    break
                self.capacity.clear()
                if wait is None:
                    await self.capacity.wait()
                else:
                    try:
                        await asyncio.wait_for(self.capacity.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
            n = min(-(-room // self.waiting_pollers), MAX_BATCH)
            self.reserved += n
            return n
        finally:
            self.waiting_pollers -= 1

    async def pause(self, delay: float) -> None:
        """Sleeps ``delay`` seconds, or less if the worker starts stopping."""
        try:
            await asyncio.wait_for(self.stop_event.wait(), delay)
        except asyncio.TimeoutError:
            pass

    def unreserve(self, n: int) -> None:
        if n:
            self.reserved -= n
            self.capacity.set()

    async def poll(self, queue: str) -> None:
        errors = Backoff(base=0.2, cap=5.0)
        empty = Backoff(base=0.05, cap=1.0)
        s = self.s
        while not self.stopping:
            n = await self.reserve()
            if n == 0:
                return
            sent = self.loop.time()
            try:
                jobs = await self.lease(queue, n)
            except KeelError as e:
                self.unreserve(n)
                delay = max(errors.next(), min(e.retry_after or 0.0, 60.0))
                self._log_lease_error(queue, e, delay, first=errors.failures == 1)
                await self.pause(delay)
                continue
            except asyncio.CancelledError:
                self.unreserve(n)
                raise
            except Exception:
                self.unreserve(n)
                self.log.exception("lease on queue %s failed unexpectedly", queue)
                await self.pause(errors.next())
                continue
            took = self.loop.time() - sent
            if errors.failures:
                self.log.info("lease on queue %s works again", queue)
                errors.reset()
            # Only an answer that did not wait measures the round trip: a full one (the jobs
            # were there) or any with no wait asked. One that waited for work would count
            # the wait.
            full = len(jobs) >= n
            if full or s.poll_wait == 0:
                self.pace.leased(took)
            # Slow start after an idle spell, as keel-client's Rust worker and the built-in
            # dispatchers do: a full answer to slots with nothing left buffered doubles the
            # prefetch floor; any other answer halves it (see keel._pace).
            self.pace.answered(full, not self.buffer and self.active < s.concurrency)
            self.reserved -= n
            taken, extra = jobs[:n], jobs[n:]
            for job in extra:
                self.log.error("the server leased more jobs than asked for; releasing %s", job.id)
                self.spawn(
                    self.release(job, job.lease.token if job.lease and job.lease.token else "")
                )
            self.take(taken, sent)
            if len(taken) < n:
                self.capacity.set()
            if taken:
                empty.reset()
            elif s.poll_wait == 0 or took < s.poll_wait / 2:
                # An empty answer well before the wait ran out: the server is draining (or
                # the wait is 0). Pause instead of spinning.
                await self.pause(empty.next())

    async def lease(self, queue: str, n: int) -> List[Job]:
        s = self.s
        self.polls_in_flight += 1
        try:
            return await self.client.lease(
                queue, s.worker_id, max=n, wait=s.poll_wait, lease=s.lease, kinds=self.kinds
            )
        finally:
            self.polls_in_flight -= 1

    def _log_lease_error(self, queue: str, e: KeelError, delay: float, first: bool) -> None:
        """Logs a failed lease; while an outage lasts, only its first failure is a warning."""
        if e.slug == "queue-served-here":
            self.log.error(
                "queue %s is served by the server's own workers (KEEL_QUEUES), so this worker "
                "cannot lease from it; retrying in %.1fs",
                queue,
                delay,
            )
        elif not _transient(e):
            self.log.error("lease on queue %s refused: %s; retrying in %.1fs", queue, e, delay)
        else:
            level = logging.WARNING if first else logging.DEBUG
            self.log.log(level, "lease on queue %s failed: %s; retrying in %.1fs", queue, e, delay)

    # -- holding jobs -----------------------------------------------------------------------

    def take(self, jobs: List[Job], sent: float) -> None:
        """Holds freshly leased jobs (leased at ``sent``): heartbeats start, and they join
        the buffer and start on the free slots; or, once stopping, they are released."""
        fresh: List[_Held] = []
        for job in jobs:
            if job.lease is None or job.lease.token is None:
                self.log.error("job %s was leased without a token; skipping it", job.id)
                continue
            h = _Held(job, job.lease.token, sent + self.s.lease)
            self.held[job.id] = h
            h.heartbeats = self.loop.create_task(self.heartbeat(h))
            fresh.append(h)
        if not fresh:
            return
        self.idle.clear()
        if self.stopping:
            # Leased just as the worker began to stop: give them back unrun.
            self.spawn(self.release_held(fresh))
            return
        self.buffer.extend(fresh)
        self.start_buffered()

    def start_buffered(self) -> None:
        """Starts buffered jobs on the free slots, oldest first (none once stopping)."""
        started = 0
        while self.buffer and self.active < self.s.concurrency and not self.stopping:
            h = self.buffer.popleft()
            h.buffered = False
            h.slot = True
            h.in_handler = True
            self.active += 1
            h.task = self.loop.create_task(self.run_job(h))
            started += 1
        if started:
            self.pace.started(started)

    def free_slot(self, h: _Held) -> None:
        """Gives ``h``'s slot to the next buffered job (idempotent)."""
        if h.slot:
            h.slot = False
            self.active -= 1
            self.start_buffered()
            self.capacity.set()

    def forget(self, h: _Held) -> None:
        """The job is no longer held: its heartbeats stop (idempotent)."""
        if h.buffered:
            h.buffered = False
            try:
                self.buffer.remove(h)
            except ValueError:
                pass  # already taken out for release at stop
            self.capacity.set()
        if h.heartbeats is not None and h.heartbeats is not asyncio.current_task():
            h.heartbeats.cancel()
        if self.held.get(h.job.id) is h:
            del self.held[h.job.id]
            if not self.held:
                self.idle.set()

    # -- running a job --------------------------------------------------------------------

    async def run_job(self, h: _Held) -> None:
        """Runs a job started on a slot, hands its outcome over (which frees the slot) and
        waits for the server's answer; the job stays held, so heartbeated, until then."""
        try:
            outcome = await self.execute(h)
            h.in_handler = False
            if h.gone is not None:
                self.log.info("job %s: %s, so its outcome is not reported", h.job.id, h.gone)
                return
            await self.report(h, outcome)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("job %s: unexpected error in the worker", h.job.id)
        finally:
            h.in_handler = False
            self.free_slot(h)
            self.forget(h)

    async def execute(self, h: _Held) -> Outcome:
        job = h.job
        registered = self.s.handlers.get(job.kind)
        if registered is None:
            return Outcome.failure(
                f"no handler for kind {job.kind!r} in worker {self.s.worker_id} "
                f"(it handles: {', '.join(sorted(self.s.handlers))})",
                permanent=True,
            )
        try:
            if registered.is_async:
                value = await registered.fn(h.ctx, job.args)
            else:
                value = await asyncio.wrap_future(self.pool.submit(registered.fn, h.ctx, job.args))
            if inspect.isawaitable(value):  # a plain function that returned a coroutine
                value = await value
        except asyncio.CancelledError:
            raise
        except PermanentError as e:
            msg = str(e) or type(e).__name__
            self.log.warning("job %s (%s) failed permanently: %s", job.id, job.kind, msg)
            return Outcome.failure(msg, permanent=True)
        except RetryIn as e:
            msg = str(e)
            self.log.info("job %s (%s) asked to retry in %gs: %s", job.id, job.kind, e.seconds, msg)
            return Outcome.failure(msg, retry_in=e.seconds)
        except BaseException as e:  # SystemExit from a handler fails the attempt too
            msg = f"{type(e).__name__}: {e}"
            self.log.warning(
                "job %s (%s) attempt %d failed: %s", job.id, job.kind, job.attempt, msg, exc_info=e
            )
            return Outcome.failure(msg)
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as e:
            msg = (
                f"the handler's result is not JSON-serialisable ({type(e).__name__}: {e}); "
                "return None, a bool, a number, a string, or lists and dicts of them"
            )
            self.log.warning("job %s (%s): %s", job.id, job.kind, msg)
            return Outcome.failure(msg)
        return Outcome(True, result=value)

    async def heartbeat(self, h: _Held) -> None:
        interval = self.s.heartbeat_interval
        backoff = Backoff(base=0.2, cap=interval)
        delay = interval
        while True:
            await asyncio.sleep(delay)
            sent = self.loop.time()
            try:
                hb = await self.client.heartbeat(h.job.id, h.token, self.s.lease)
            except KeelError as e:
                if _transient(e):
                    delay = backoff.next()
                    self.log.log(
                        logging.WARNING if backoff.failures == 1 else logging.DEBUG,
                        "heartbeat of job %s failed: %s; retrying in %.1fs",
                        h.job.id,
                        e,
                        delay,
                    )
                    continue
                self.lose(h, "lease lost", e.detail)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("heartbeat of job %s failed unexpectedly", h.job.id)
                delay = backoff.next()
                continue
            backoff.reset()
            delay = interval
            if hb.cancel_requested:
                self.lose(h, "cancelled", "the job was cancelled")
                return
            h.lease_until = sent + self.s.lease

    def lose(self, h: _Held, reason: str, detail: str) -> None:
        """A heartbeat found the job cancelled or its lease lost: a running handler is told
        to stop; a buffered job is dropped without running."""
        if h.gone is None:
            h.gone = reason
        if h.task is None:  # not started: buffered, or being released at stop
            if reason == "cancelled":
                self.log.info(
                    "job %s (%s) was cancelled before it started; dropped", h.job.id, h.job.kind
                )
            else:
                self.log.warning(
                    "job %s (%s): %s before it started (%s); dropped",
                    h.job.id,
                    h.job.kind,
                    reason,
                    detail,
                )
            self.forget(h)
            return
        if reason == "cancelled":
            self.log.info(
                "job %s (%s) was cancelled; its handler is told to stop", h.job.id, h.job.kind
            )
        else:
            self.log.warning(
                "job %s (%s): %s (%s); its handler is told to stop",
                h.job.id,
                h.job.kind,
                reason,
                detail,
            )
        h.ctx._cancel(reason)

    # -- reporting --------------------------------------------------------------------------

    async def report(self, h: _Held, outcome: Outcome) -> None:
        """Hands the outcome to its batcher, frees the slot as soon as the batcher took it,
        and waits for the answer, retrying transient failures while the lease lasts."""
        backoff = Backoff(base=0.2, cap=5.0)
        job = h.job
        while True:
            fut: "asyncio.Future[Any]"
            # A full batcher makes this wait, and the slot with it (backpressure).
            if outcome.complete:
                fut = await self.completer.submit(
                    {"id": job.id, "token": h.token, "result": outcome.result}
                )
            else:
                item: Failure = {
                    "id": job.id,
                    "token": h.token,
                    "error": outcome.error,
                    "permanent": outcome.permanent,
                    "retry_in": outcome.retry_in,
                }
                fut = await self.failer.submit(item)
            # The outcome is on its way: the slot takes its next job while the server
            # writes this one. The heartbeat keeps the lease until the answer.
            self.free_slot(h)
            try:
                res = await fut
            except KeelError as e:
                if not _transient(e):
                    self.log.error("job %s: the outcome was refused: %s", job.id, e)
                    return
                status, detail = 0, str(e)
            else:
                if res.ok:
                    self.log.debug(
                        "job %s: %s reported",
                        job.id,
                        "completion" if outcome.complete else "failure",
                    )
                    return
                status = res.status
                detail = res.error.detail if res.error is not None else f"status {status}"
                if status == 409:
                    # The lease went stale: cancelled, finished, or rescued and run elsewhere.
                    self.log.info("job %s: outcome not recorded (%s)", job.id, detail)
                    return
                if status in (413, 422) and outcome.complete:
                    self.log.warning("job %s: the server refused the result: %s", job.id, detail)
                    outcome = Outcome.failure(f"the server refused the handler's result: {detail}")
                    continue
                if status < 500 and status not in (408, 425, 429):
                    self.log.error(
                        "job %s: the outcome was refused (%d): %s", job.id, status, detail
                    )
                    return
            if h.gone is not None:
                return
            if self.loop.time() >= h.lease_until:
                self.log.error(
                    "job %s: could not report its outcome before its lease lapsed (%s); "
                    "it will be rescued and run again",
                    job.id,
                    detail,
                )
                return
            delay = backoff.next()
            self.log.log(
                logging.WARNING if backoff.failures == 1 else logging.DEBUG,
                "job %s: reporting the outcome failed (%s); retrying in %.1fs",
                job.id,
                detail,
                delay,
            )
            await asyncio.sleep(delay)


async def _first(*aws: Awaitable[Any], timeout: float) -> None:
    """Waits until the first of ``aws`` finishes, or ``timeout`` passes; cancels the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
