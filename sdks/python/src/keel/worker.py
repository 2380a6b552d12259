"""The worker: leases jobs over HTTP, runs their handlers, and reports what happened.

It follows docs/workers.md:

- **lease ahead (prefetch)**: each queue has one poller that long-polls
  ``POST /v1/queues/{queue}/lease`` with ``max`` = the free slots plus a small buffer (at
  most ``prefetch`` jobs) minus the jobs already buffered, so a slot that frees up takes its
  next job from the buffer instead of waiting for a lease round trip. The buffer follows
  the worker's pace (jobs started per second × the lease round trip × 4, see
  :mod:`keel._pace`): millisecond jobs keep dozens buffered, long jobs one. After an idle
  spell, while leases come back full to starving slots, it doubles at each lease (a slow
  start) until the measured rate catches up. With jobs buffered, the poller leases again
  once a quarter of the slots and buffer is free, so a busy worker leases in batches.
  Buffered jobs are leased jobs: they are heartbeated, one found cancelled or lost is
  dropped unrun, and on stop they are released at once;
- **heartbeat** every held job (buffered, running, or with its outcome on its way) every
  ``heartbeat_interval`` (a third of the lease); when the answer says
  ``cancel_requested``, a running handler's :class:`~keel.Context` is cancelled;
- **report outcomes in batches**: completions (and failures) that finish within
  ``batch_window`` of each other go in one ``POST /v1/jobs/complete`` (``/v1/jobs/fail``).
  A job's slot is freed as soon as its outcome is handed to the batcher, not when the
  server answers; the batcher is bounded, and a full one holds the slot back
  (backpressure);
- **stop gracefully** on SIGTERM/SIGINT or :meth:`Worker.stop`: start no lease request
  from then on, release the buffered jobs no slot started (``/release``: the attempt is not
  counted), let running jobs finish within ``grace``, then release the rest and return. A
  long poll already in flight is waited for (at most ``poll_wait``) rather than abandoned,
  and what it brings is released unrun, so no job is ever leased to a connection the
  worker just closed.

Network errors are retried with capped exponential backoff and jitter, and never end the
worker. Everything runs on one asyncio loop; plain handlers run on a pool of
``concurrency`` threads, ``async def`` handlers on the loop itself.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import signal
import socket
import threading
from types import FrameType
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Optional,
    Sequence,
    TypeVar,
    Union,
)

from . import _protocol as p
from ._config import CaCertPath, ClientConfig
from ._pace import DEFAULT_PREFETCH, MAX_PREFETCH
from ._runtime import Handler, Registered, Run, Settings
from .aio import AsyncClient
from .client import Client

__all__ = ["Worker", "Handler"]

H = TypeVar("H", bound=Handler)

_WORKER_ID = re.compile(r"[^A-Za-z0-9_.:-]")
#: The longest a lease may long-poll (docs/workers.md).
_MAX_WAIT = 30.0


def default_worker_id() -> str:
    """``host:pid``, reduced to the characters a worker name may hold."""
    name = f"{socket.gethostname() or 'worker'}:{os.getpid()}"
    return _WORKER_ID.sub("-", name)[:255]


class Worker:
    """Runs handlers for the jobs of one or more queues.

    ``client`` is a :class:`keel.Client`, a :class:`keel.AsyncClient` or the server's URL;
    the worker opens its own connections with the same URL, key, timeout and ``ca_cert``.
    ``ca_cert`` is for a URL (the path of a PEM file of CA certificates to trust for an
    ``https://`` URL, as :class:`keel.Client` takes it); a client's own is used otherwise,
    and giving one with a client is a :class:`ValueError`. ``queues`` must
    be queues the server does not serve itself (not in its ``KEEL_QUEUES``).
    ``concurrency`` is how many jobs run at once, ``lease`` how long each lease lasts between
    heartbeats (5 s to 1 h), ``grace`` how long running jobs get to finish on stop, and
    ``batch_window`` how long a finished job's outcome waits for others to share its
    request. ``worker_id`` names the worker in ``GET /v1/workers`` and in job leases
    (default ``host:pid``). ``poll_wait`` is how long one lease request waits for work.

    ``prefetch`` caps how many leased jobs the worker holds beyond its slots (default
    256; at most 10 000). A slot that frees up then starts its next job at once instead of
    waiting for a lease round trip, which for short jobs is most of a job's time. The
    buffer actually kept follows the worker's pace (jobs started per second × the lease
    round trip × 4, at least 1, doubling at each full lease while the slots starve after an
    idle spell), so long jobs do not wait in it while other workers sit idle; the cap bounds
    it when jobs are very short or the server slow. Buffered jobs are heartbeated like
    running ones, and released unrun (no attempt used) when the worker stops.
    ``prefetch=0`` leases only for free slots, as before this option existed.

    Register handlers with :meth:`handler`, then :meth:`run` (blocking) or
    :meth:`run_async`. A worker runs once.
    """

    #: ``prefetch`` when none is given.
    DEFAULT_PREFETCH = DEFAULT_PREFETCH
    #: The largest ``prefetch`` accepted.
    MAX_PREFETCH = MAX_PREFETCH

    def __init__(
        self,
        client: Union[Client, AsyncClient, str],
        queues: Sequence[str],
        concurrency: int = 10,
        lease: float = 30.0,
        heartbeat_interval: Optional[float] = None,
        grace: float = 30.0,
        worker_id: Optional[str] = None,
        batch_window: float = 0.005,
        *,
        poll_wait: float = 10.0,
        prefetch: int = DEFAULT_PREFETCH,
        ca_cert: Optional[CaCertPath] = None,
    ) -> None:
        if isinstance(client, (Client, AsyncClient)):
            if ca_cert is not None:
                raise ValueError(
                    "ca_cert goes with a URL; a worker made from a client uses the "
                    "client's own ca_cert (give it to keel.Client)"
                )
            self._config = client.config
        elif isinstance(client, str):
            self._config = ClientConfig.make(client, None, 30.0, ca_cert)
        else:
            raise TypeError("client must be a keel.Client, a keel.AsyncClient or a URL")
        if isinstance(queues, str):
            queues = [queues]
        self._queues = list(dict.fromkeys(queues))
        if not self._queues or not all(isinstance(q, str) and q for q in self._queues):
            raise ValueError("queues must name at least one queue")
        if not isinstance(concurrency, int) or not 1 <= concurrency <= p.MAX_BATCH:
            raise ValueError(f"concurrency must be between 1 and {p.MAX_BATCH}")
        self._concurrency = concurrency
        self._lease = p.seconds_of(lease, "lease")
        if not 5.0 <= self._lease <= 3600.0:
            raise ValueError("lease must be between 5 s and 1 h (the server's bounds)")
        interval = (
            self._lease / 3
            if heartbeat_interval is None
            else p.seconds_of(heartbeat_interval, "heartbeat_interval")
        )
        if not 0 < interval < self._lease:
            raise ValueError("heartbeat_interval must be above 0 and under the lease")
        self._heartbeat_interval = interval
        self._grace = p.seconds_of(grace, "grace")
        self._batch_window = p.seconds_of(batch_window, "batch_window")
        self._poll_wait = p.seconds_of(poll_wait, "poll_wait")
        if self._poll_wait > _MAX_WAIT:
            raise ValueError(f"poll_wait must be at most {_MAX_WAIT:g} s")
        if (
            not isinstance(prefetch, int)
            or isinstance(prefetch, bool)
            or not 0 <= prefetch <= MAX_PREFETCH
        ):
            raise ValueError(f"prefetch must be an integer between 0 and {MAX_PREFETCH}")
        self._prefetch = prefetch
        wid = worker_id if worker_id is not None else default_worker_id()
        if not 1 <= len(wid.encode()) <= 255 or _WORKER_ID.search(wid):
            raise ValueError("worker_id must be 1 to 255 of A-Z a-z 0-9 _ . : -")
        self._worker_id = wid
        self._handlers: Dict[str, Registered] = {}
        self._log = logging.getLogger("keel.worker")
        # stop() may come from any thread; these fields are guarded by the lock.
        self._lock = threading.Lock()
        self._stop_requested = False
        self._run: Optional[Run] = None
        self._ran = False

    # -- configuration ------------------------------------------------------------------

    @property
    def worker_id(self) -> str:
        return self._worker_id

    @property
    def queues(self) -> List[str]:
        return list(self._queues)

    @property
    def concurrency(self) -> int:
        return self._concurrency

    @property
    def prefetch(self) -> int:
        """Most leased jobs held beyond the slots (0: prefetch off)."""
        return self._prefetch

    @property
    def kinds(self) -> List[str]:
        """The kinds a handler is registered for."""
        return list(self._handlers)

    def handler(self, kind: str) -> Callable[[H], H]:
        """Decorator registering ``fn(ctx, args)`` for jobs of ``kind``.

        A plain function runs on the worker's thread pool; an ``async def`` one on its
        event loop (it must not block it). The return value, which must be
        JSON-serialisable, is the job's result. An exception fails the attempt (retried per
        the job's backoff); :class:`keel.PermanentError` discards the job;
        :class:`keel.RetryIn` retries it after the given delay.
        """

        def register(fn: H) -> H:
            self.register(kind, fn)
            return fn

        return register

    def register(self, kind: str, fn: Handler) -> None:
        """Registers ``fn`` for ``kind`` (what :meth:`handler` does)."""
        if not isinstance(kind, str) or not kind:
            raise ValueError("a handler needs a kind")
        if not callable(fn):
            raise TypeError("a handler must be callable")
        with self._lock:
            if self._run is not None:
                raise RuntimeError("register handlers before the worker runs")
            if kind in self._handlers:
                raise ValueError(f"a handler for kind {kind!r} is already registered")
            self._handlers[kind] = Registered(fn, _is_async(fn))

    # -- running ------------------------------------------------------------------------

    def run(self) -> None:
        """Runs until SIGTERM/SIGINT or :meth:`stop`, then stops gracefully and returns.

        Signal handlers are installed only when called from the main thread. A second
        signal skips what is left of the grace period and abandons a long poll in flight.
        Blocks the calling thread.
        """
        asyncio.run(self.run_async())

    async def run_async(self, *, handle_signals: bool = True) -> None:
        """The coroutine behind :meth:`run`, for a program that owns its event loop.

        Signal handlers are installed when ``handle_signals`` and on the main thread.
        """
        if not self._handlers:
            raise RuntimeError("register at least one handler before running the worker")
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._ran:
                raise RuntimeError("a Worker runs once; create a new one to run again")
            self._ran = True
            run = Run(self._settings(), loop)
            self._run = run
            if self._stop_requested:
                run.request_stop()
        restore = self._install_signals(loop, run) if handle_signals else None
        try:
            await run.main()
        finally:
            if restore is not None:
                restore()
            with self._lock:
                self._run = None

    def stop(self) -> None:
        """Asks the worker to stop: no new leases, buffered jobs are released at once,
        running jobs get ``grace`` to finish, the rest are released. Returns at once;
        :meth:`run` returns when done.

        Thread-safe, and callable from a handler. Before :meth:`run`, it makes ``run``
        return at once.
        """
        with self._lock:
            self._stop_requested = True
            run = self._run
        if run is not None:
            run.request_stop_threadsafe()

    def _install_signals(
        self, loop: asyncio.AbstractEventLoop, run: Run
    ) -> Optional[Callable[[], None]]:
        if threading.current_thread() is not threading.main_thread():
            return None
        sigs = [signal.SIGTERM, signal.SIGINT]

        def on_signal(sig: int) -> None:
            name = signal.Signals(sig).name
            if run.stopping:
                self._log.warning("%s again: releasing running jobs now", name)
                run.hurry()
            else:
                self._log.info("%s received: stopping (grace %gs)", name, self._grace)
                self.stop()

        installed: List[int] = []
        previous: Dict[int, Any] = {}
        for sig in sigs:
            try:
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):
                # No loop signal support (Windows): a plain handler that hops to the loop.
                def plain(signum: int, frame: Optional[FrameType]) -> None:
                    loop.call_soon_threadsafe(on_signal, signum)

                previous[sig] = signal.signal(sig, plain)

        def restore() -> None:
            for sig in installed:
                loop.remove_signal_handler(sig)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def _settings(self) -> Settings:
        return Settings(
            config=self._config,
            queues=tuple(self._queues),
            concurrency=self._concurrency,
            lease=self._lease,
            heartbeat_interval=self._heartbeat_interval,
            grace=self._grace,
            batch_window=self._batch_window,
            poll_wait=self._poll_wait,
            worker_id=self._worker_id,
            handlers=dict(self._handlers),
            prefetch=self._prefetch,
        )

    def __repr__(self) -> str:
        return (
            f"keel.Worker(id={self._worker_id!r}, queues={self._queues!r}, "
            f"concurrency={self._concurrency}, prefetch={self._prefetch})"
        )


def _is_async(fn: Any) -> bool:
    """Whether calling ``fn`` gives a coroutine: an ``async def`` function, a partial of one,
    or an object whose ``__call__`` is one."""
    if inspect.iscoroutinefunction(fn):
        return True
    inner = getattr(fn, "func", None)  # functools.partial
    if inner is not None and inspect.iscoroutinefunction(inner):
        return True
    return inspect.iscoroutinefunction(inspect.getattr_static(type(fn), "__call__", None))
