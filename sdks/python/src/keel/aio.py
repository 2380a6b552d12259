"""The asyncio client: the same calls as :class:`keel.Client`, awaited."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from types import TracebackType
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Type, TypeVar, Union

import httpx

from . import _protocol as p
from ._backoff import poll_delays
from ._config import CaCertPath, ClientConfig
from ._protocol import Completion, Failure, JobSpec, Seconds
from .errors import TransportError, WaitTimeout
from .models import (
    Heartbeat,
    Job,
    JobPage,
    JobResult,
    OutcomeResult,
    QueueInfo,
    WorkerInfo,
)

T = TypeVar("T")

__all__ = ["AsyncClient"]


class AsyncClient:
    """A non-blocking client for one Keel server, on ``httpx.AsyncClient``.

    Same arguments (``ca_cert`` included), methods and errors as :class:`keel.Client`, but
    no ``grpc_target``: every call goes over HTTP. Every method is a coroutine. Use it from
    one event loop, and ``await client.close()`` (or ``async with``) when done.
    """

    def __init__(
        self,
        url: str,
        api_key: Optional[str] = None,
        timeout: float = 30.0,
        *,
        ca_cert: Optional[CaCertPath] = None,
    ) -> None:
        self._config = ClientConfig.make(url, api_key, timeout, ca_cert)
        self._http = self._transport(self._config, None)

    @classmethod
    def _from_config(cls, config: ClientConfig, max_connections: Optional[int]) -> "AsyncClient":
        """A client with a pool sized for a worker: every running job heartbeats, and each
        queue keeps a long poll open, so the default pool of 100 could be too small."""
        self = cls.__new__(cls)
        self._config = config
        self._http = cls._transport(config, max_connections)
        return self

    @staticmethod
    def _transport(config: ClientConfig, max_connections: Optional[int]) -> httpx.AsyncClient:
        limits = httpx.Limits()
        if max_connections is not None:
            limits = httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            )
        return httpx.AsyncClient(
            base_url=config.url,
            headers=config.headers(),
            timeout=config.timeout,
            limits=limits,
            verify=config.verify(),
        )

    @property
    def url(self) -> str:
        """The server's base URL."""
        return self._config.url

    @property
    def config(self) -> ClientConfig:
        """The settings this client was made with."""
        return self._config

    def __repr__(self) -> str:
        return f"keel.AsyncClient({self._config.url!r})"

    # -- lifecycle ---------------------------------------------------------------------

    async def close(self) -> None:
        """Closes the connection pool. The client cannot be used afterwards."""
        await self._http.aclose()

    aclose = close

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.close()

    async def _call(self, call: "p.Call[T]") -> T:
        try:
            resp = await self._http.request(
                call.method,
                call.path,
                content=call.content(),
                headers=call.request_headers(),
                timeout=self._config.timeout + call.extra_timeout,
            )
        except httpx.TransportError as e:
            reason = str(e) or type(e).__name__
            raise TransportError(
                f"{call.method} {self._config.url}{call.path} failed: {reason}"
            ) from e
        if resp.status_code not in call.ok:
            raise p.error_from_response(resp)
        return call.parse(resp)

    # -- jobs ----------------------------------------------------------------------------

    async def enqueue(
        self,
        kind: str,
        args: Any = None,
        *,
        queue: Optional[str] = None,
        priority: Optional[int] = None,
        max_attempts: Optional[int] = None,
        timeout: Optional[Seconds] = None,
        run_at: Union[datetime, str, None] = None,
        delay: Optional[Seconds] = None,
        tags: Optional[Sequence[str]] = None,
        meta: Optional[Mapping[str, Any]] = None,
        unique: Optional[Mapping[str, Any]] = None,
        backoff: Optional[Mapping[str, Any]] = None,
        tenant: Optional[str] = None,
        idempotency_key: Optional[str] = None,
    ) -> Job:
        """Enqueues one job; see :meth:`keel.Client.enqueue`."""
        body = p.job_body(
            kind,
            args,
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            timeout=timeout,
            run_at=run_at,
            delay=delay,
            tags=tags,
            meta=meta,
            unique=unique,
            backoff=backoff,
            tenant=tenant,
        )
        return await self._call(p.enqueue(body, idempotency_key))

    async def enqueue_many(
        self, jobs: Iterable[JobSpec], *, idempotency_key: Optional[str] = None
    ) -> List[Job]:
        """Enqueues 1 to 1000 jobs atomically; see :meth:`keel.Client.enqueue_many`."""
        return await self._call(p.enqueue_many(jobs, idempotency_key))

    async def get(self, id: str) -> Job:
        """The job ``id``."""
        return await self._call(p.get(id))

    async def result(self, id: str) -> JobResult:
        """The job's result, or its state until it completes; see :meth:`keel.Client.result`."""
        return await self._call(p.result(id))

    async def cancel(self, id: str) -> Job:
        """Cancels a job that has not finished."""
        return await self._call(p.cancel(id))

    async def wait(self, id: str, timeout: Seconds = 60.0) -> Job:
        """Polls the job until it reaches a terminal state; :class:`keel.WaitTimeout` after
        ``timeout`` seconds."""
        limit = p.seconds_of(timeout, "timeout")
        deadline = time.monotonic() + limit
        delays = poll_delays()
        while True:
            job = await self.get(id)
            if job.terminal:
                return job
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(f"job {id} is still {job.state} after {limit:g}s", job=job)
            await asyncio.sleep(min(next(delays), remaining))

    async def list_jobs(
        self,
        *,
        queue: Optional[str] = None,
        state: Optional[str] = None,
        kind: Optional[str] = None,
        tenant: Optional[str] = None,
        after: Optional[str] = None,
        limit: Optional[int] = None,
    ) -> JobPage:
        """One page of jobs (oldest first) matching every filter given; pass the page's
        ``next`` as ``after`` for the next one. ``limit`` is 1 to 1000 (default 100)."""
        return await self._call(p.list_jobs(queue, state, kind, tenant, after, limit))

    async def queues(self) -> List[QueueInfo]:
        """Every queue with jobs, sorted by name: paused or not, and its jobs by state."""
        return await self._call(p.queues())

    async def queue(self, name: str) -> QueueInfo:
        """One queue and its jobs by state; see :meth:`keel.Client.queue`."""
        return await self._call(p.queue(name))

    async def workers(self) -> List[WorkerInfo]:
        """The workers seen by this server in the last 5 minutes."""
        return await self._call(p.workers())

    # -- worker protocol -----------------------------------------------------------------

    async def lease(
        self,
        queue: str,
        worker: str,
        max: int = 1,
        wait: Seconds = 0.0,
        lease: Seconds = 30.0,
        kinds: Optional[Sequence[str]] = None,
    ) -> List[Job]:
        """Leases up to ``max`` jobs of ``queue``; see :meth:`keel.Client.lease`."""
        return await self._call(p.lease(queue, worker, max, wait, lease, kinds))

    async def heartbeat(self, id: str, token: str, lease: Optional[Seconds] = None) -> Heartbeat:
        """Renews a lease; see :meth:`keel.Client.heartbeat`."""
        return await self._call(p.heartbeat(id, token, lease))

    async def complete(self, id: str, token: str, result: Any = None) -> Job:
        """Reports success with ``result``."""
        return await self._call(p.complete(id, token, result))

    async def fail(
        self,
        id: str,
        token: str,
        error: str,
        permanent: bool = False,
        retry_in: Optional[Seconds] = None,
    ) -> Job:
        """Reports a failed attempt; see :meth:`keel.Client.fail`."""
        return await self._call(p.fail(id, token, error, permanent, retry_in))

    async def release(self, id: str, token: str) -> Job:
        """Gives a leased job back unrun; the attempt is not counted."""
        return await self._call(p.release(id, token))

    async def complete_many(self, outcomes: Sequence[Completion]) -> List[OutcomeResult]:
        """Reports 1 to 1000 completions in one request; one result per item, in order."""
        return await self._call(p.complete_many(outcomes))

    async def fail_many(self, outcomes: Sequence[Failure]) -> List[OutcomeResult]:
        """Reports 1 to 1000 failures in one request; one result per item, in order."""
        return await self._call(p.fail_many(outcomes))
