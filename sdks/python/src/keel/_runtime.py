"""The engine behind :class:`keel.Worker`: one run's pollers, jobs, heartbeats and reports.

Everything here lives on the worker's event loop, so its counters need no lock; the only
way in from another thread is :meth:`Run.request_stop_threadsafe`. See
:mod:`keel.worker` for the protocol it follows.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, Dict, List, Mapping, Optional, Set, Tuple

from ._backoff import Backoff
from ._batcher import Batcher
from ._config import ClientConfig
from ._protocol import Completion, Failure
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
#: How long a busy worker waits for half its slots to free before leasing (see reserve).
_GATHER = 0.002


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


class _Running:
    """One job this worker holds, from lease to acknowledged outcome."""

    def __init__(self, job: Job, ctx: Context, lease_until: float) -> None:
        assert job.lease is not None and job.lease.token is not None
        self.job = job
        self.token: str = job.lease.token
        self.ctx = ctx
        #: Loop time by which the lease lapses unless renewed.
        self.lease_until = lease_until
        #: Why the job is no longer ours ("cancelled", "lease lost", "released"), if it isn't.
        self.gone: Optional[str] = None
        #: True while the handler runs; False once its outcome is being reported.
        self.in_handler = True
        self.task: Optional["asyncio.Task[None]"] = None


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
        self.running: Dict[str, _Running] = {}
        self.busy = 0  # jobs held: running or being reported
        self.reserved = 0  # slots promised to a lease request in flight
        self.waiting_pollers = 0
        self.polls_in_flight = 0
        self.capacity = asyncio.Event()  # set whenever slots may have freed
        self.idle = asyncio.Event()  # set while busy == 0
        self.idle.set()
        self.stop_event = asyncio.Event()
        self.hurry_event = asyncio.Event()
        self.stopping = False
        self.background: Set["asyncio.Task[Any]"] = set()
        self.completer: Batcher[Completion] = Batcher(self.client.complete_many, s.batch_window)
        self.failer: Batcher[Failure] = Batcher(self.client.fail_many, s.batch_window)

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
            "worker %s started: queues %s, concurrency %d, kinds %s",
            s.worker_id,
            ",".join(s.queues),
            s.concurrency,
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

        No lease request starts any more, but a long poll already in flight is waited for
        (at most ``poll_wait``) rather than abandoned: the server may lease jobs to it until
        it answers, and jobs leased to a connection just closed would sit until their lease
        lapsed, then run again with an attempt used. Whatever the poll brings is released
        unrun. Running jobs get the grace period; those still running after it are
        released. :meth:`hurry` cuts both waits short.
        """
        s = self.s
        self.log.info(
            "stopping: no new leases; %d running job(s) get up to %gs to finish",
            self.busy,
            s.grace,
        )
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
        # Outcomes on their way get a last chance to arrive.
        self.completer.flush()
        self.failer.flush()
        await _first(self.idle.wait(), timeout=_FINAL_FLUSH)
        leftover = [r.task for r in self.running.values() if r.task is not None]
        for t in leftover:
            t.cancel()
        await asyncio.gather(*leftover, return_exceptions=True)
        for t in list(self.background):
            t.cancel()
        await asyncio.gather(*list(self.background), return_exceptions=True)

    async def abandon(self) -> None:
        """After the grace period: release every job whose handler still runs."""
        stuck = [r for r in self.running.values() if r.in_handler]
        if not stuck:
            return
        # Jobs already cancelled or lost are no longer ours to release.
        held = [r for r in stuck if r.gone is None]
        self.log.warning("releasing %d job(s) whose handler is still running", len(held))
        for r in held:
            r.gone = "released"
        await asyncio.gather(*(self.release(r.job, r.token) for r in held))
        for r in stuck:
            r.ctx._cancel("shutdown")
            if r.task is not None:
                # An async handler is cancelled; a thread cannot be, and finishes unheard.
                r.task.cancel()
        await asyncio.gather(*(r.task for r in stuck if r.task is not None), return_exceptions=True)

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

    async def reserve(self) -> int:
        """Waits for free slots and promises some to one lease request (0: stopping).

        With several queues, the free slots are shared among the pollers waiting for them,
        so one queue's idle long poll cannot hold every slot while another has work.
        """
        self.waiting_pollers += 1
        try:
            gather_until: Optional[float] = None
            while not self.stopping:
                free = self.s.concurrency - self.busy - self.reserved
                # A busy worker waits a moment (_GATHER) for half its slots, so it leases in
                # batches rather than one job per round trip, as keel-client's Rust worker
                # does.
                want = max(1, self.s.concurrency // 2)
                if 0 < free < want:
                    now = self.loop.time()
                    if gather_until is None:
                        gather_until = now + _GATHER
                    if now < gather_until:
                        self.capacity.clear()
                        try:
                            await asyncio.wait_for(self.capacity.wait(), gather_until - now)
                        except asyncio.TimeoutError:
                            pass
                        continue
                if free > 0:
                    n = -(-free // self.waiting_pollers)
                    self.reserved += n
                    return n
                self.capacity.clear()
                await self.capacity.wait()
            return 0
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
            if errors.failures:
                self.log.info("lease on queue %s works again", queue)
                errors.reset()
            self.reserved -= n
            taken, extra = jobs[:n], jobs[n:]
            self.busy += len(taken)
            if taken:
                self.idle.clear()
            if len(taken) < n:
                self.capacity.set()
            for job in extra:
                self.log.error("the server leased more jobs than asked for; releasing %s", job.id)
                self.spawn(
                    self.release(job, job.lease.token if job.lease and job.lease.token else "")
                )
            for job in taken:
                self.start(job, sent)
            if taken:
                empty.reset()
            elif s.poll_wait == 0 or self.loop.time() - sent < s.poll_wait / 2:
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

    # -- running a job --------------------------------------------------------------------

    def start(self, job: Job, sent: float) -> None:
        if job.lease is None or job.lease.token is None:
            self.log.error("job %s was leased without a token; skipping it", job.id)
            self.finish_slot()
            return
        if self.stopping:
            # Leased just as the worker began to stop: give it back unrun.
            self.spawn(self._release_and_free(job, job.lease.token))
            return
        r = _Running(job, Context(job, logging.getLogger("keel.job")), sent + self.s.lease)
        self.running[job.id] = r
        r.task = self.loop.create_task(self.run_job(r))

    async def _release_and_free(self, job: Job, token: str) -> None:
        try:
            await self.release(job, token)
        finally:
            self.finish_slot()

    def finish_slot(self) -> None:
        self.busy -= 1
        self.capacity.set()
        if self.busy == 0:
            self.idle.set()

    async def run_job(self, r: _Running) -> None:
        heartbeats = self.loop.create_task(self.heartbeat(r))
        try:
            outcome = await self.execute(r)
            r.in_handler = False
            if r.gone is not None:
                self.log.info("job %s: %s, so its outcome is not reported", r.job.id, r.gone)
                return
            await self.report(r, outcome)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("job %s: unexpected error in the worker", r.job.id)
        finally:
            heartbeats.cancel()
            self.running.pop(r.job.id, None)
            self.finish_slot()

    async def execute(self, r: _Running) -> Outcome:
        job = r.job
        registered = self.s.handlers.get(job.kind)
        if registered is None:
            return Outcome.failure(
                f"no handler for kind {job.kind!r} in worker {self.s.worker_id} "
                f"(it handles: {', '.join(sorted(self.s.handlers))})",
                permanent=True,
            )
        try:
            if registered.is_async:
                value = await registered.fn(r.ctx, job.args)
            else:
                value = await asyncio.wrap_future(self.pool.submit(registered.fn, r.ctx, job.args))
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

    async def heartbeat(self, r: _Running) -> None:
        interval = self.s.heartbeat_interval
        backoff = Backoff(base=0.2, cap=interval)
        delay = interval
        while True:
            await asyncio.sleep(delay)
            sent = self.loop.time()
            try:
                hb = await self.client.heartbeat(r.job.id, r.token, self.s.lease)
            except KeelError as e:
                if _transient(e):
                    delay = backoff.next()
                    self.log.log(
                        logging.WARNING if backoff.failures == 1 else logging.DEBUG,
                        "heartbeat of job %s failed: %s; retrying in %.1fs",
                        r.job.id,
                        e,
                        delay,
                    )
                    continue
                self.lose(r, "lease lost", e.detail)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("heartbeat of job %s failed unexpectedly", r.job.id)
                delay = backoff.next()
                continue
            backoff.reset()
            delay = interval
            if hb.cancel_requested:
                self.lose(r, "cancelled", "the job was cancelled")
                return
            r.lease_until = sent + self.s.lease

    def lose(self, r: _Running, reason: str, detail: str) -> None:
        if r.gone is None:
            r.gone = reason
        if reason == "cancelled":
            self.log.info(
                "job %s (%s) was cancelled; its handler is told to stop", r.job.id, r.job.kind
            )
        else:
            self.log.warning(
                "job %s (%s): %s (%s); its handler is told to stop",
                r.job.id,
                r.job.kind,
                reason,
                detail,
            )
        r.ctx._cancel(reason)

    # -- reporting --------------------------------------------------------------------------

    async def report(self, r: _Running, outcome: Outcome) -> None:
        backoff = Backoff(base=0.2, cap=5.0)
        job = r.job
        while True:
            fut: "asyncio.Future[Any]"
            if outcome.complete:
                fut = self.completer.submit(
                    {"id": job.id, "token": r.token, "result": outcome.result}
                )
            else:
                item: Failure = {
                    "id": job.id,
                    "token": r.token,
                    "error": outcome.error,
                    "permanent": outcome.permanent,
                    "retry_in": outcome.retry_in,
                }
                fut = self.failer.submit(item)
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
            if r.gone is not None:
                return
            if self.loop.time() >= r.lease_until:
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
