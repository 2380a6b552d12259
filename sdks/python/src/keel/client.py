"""The synchronous client: enqueue and inspect jobs, and the worker protocol's raw calls."""

from __future__ import annotations

import time
from datetime import datetime
from types import TracebackType
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Type, TypeVar, Union

import httpx

from . import _protocol as p
from ._backoff import poll_delays
from ._config import CaCertPath, ClientConfig
from ._grpc_transport import GrpcTransport
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

__all__ = ["Client"]


class Client:
    """A blocking client for one Keel server.

    ``url`` is the API's base URL (``http://127.0.0.1:8080``); ``api_key`` is sent as
    ``Authorization: Bearer`` when the server has keys configured; ``timeout`` bounds each
    request's network operations in seconds. The client holds a connection pool: reuse one
    client, and :meth:`close` it (or use it as a context manager) when done. It is safe to
    share between threads.

    ``ca_cert`` is the path of a PEM file of CA certificates to trust for an ``https://``
    ``url``, on top of the default roots (httpx's: certifi's, or ``SSL_CERT_FILE``): for a
    server whose certificate (``KEEL_TLS_CERT``) a private CA signed. The file is read
    once, here; one that cannot be read or holds no valid PEM certificate raises
    :class:`ValueError` naming it. It has no effect on an ``http://`` URL.

    ``grpc_target`` (``"127.0.0.1:50051"``, the server's ``KEEL_GRPC_ADDR``) sends
    :meth:`enqueue` and :meth:`enqueue_many` over gRPC instead, which takes several times
    more enqueues per second from many threads; every other call stays on HTTP. Arguments,
    answers and errors are the same over both. It needs ``pip install 'keel-sdk[grpc]'``
    (:class:`keel.MissingDependency` otherwise); the channel uses TLS when ``url`` is
    ``https://``, and carries ``api_key`` as HTTP does. With a ``ca_cert``, the gRPC
    channel trusts *only* its certificates (grpcio takes one set of roots, not roots on
    top of its defaults), which is enough for Keel's own certificate.

    Every method raises :class:`keel.KeelError` for an error answer (with ``status``,
    ``type``, ``detail`` and, for a ``422``, the field ``errors``) and
    :class:`keel.TransportError` when no answer arrived.
    """

    def __init__(
        self,
        url: str,
        api_key: Optional[str] = None,
        timeout: float = 30.0,
        *,
        grpc_target: Optional[str] = None,
        ca_cert: Optional[CaCertPath] = None,
    ) -> None:
        self._config = ClientConfig.make(url, api_key, timeout, ca_cert)
        # Made first: a missing grpcio must fail here, before a pool is opened for nothing.
        self._grpc: Optional[GrpcTransport] = None
        if grpc_target is not None:
            self._grpc = GrpcTransport(grpc_target, self._config)
        self._http = httpx.Client(
            base_url=self._config.url,
            headers=self._config.headers(),
            timeout=self._config.timeout,
            verify=self._config.verify(),
        )

    @property
    def url(self) -> str:
        """The server's base URL."""
        return self._config.url

    @property
    def config(self) -> ClientConfig:
        """The settings this client was made with (a worker builds its transport from them)."""
        return self._config

    @property
    def grpc_target(self) -> Optional[str]:
        """Where enqueues go over gRPC, or ``None`` when they go over HTTP."""
        return self._grpc.target if self._grpc is not None else None

    def __repr__(self) -> str:
        if self._grpc is not None:
            return f"keel.Client({self._config.url!r}, grpc_target={self._grpc.target!r})"
        return f"keel.Client({self._config.url!r})"

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Closes the connection pool (and the gRPC channel). The client cannot be used
        afterwards."""
        self._http.close()
        if self._grpc is not None:
            self._grpc.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def _call(self, call: "p.Call[T]") -> T:
        try:
            resp = self._http.request(
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

    def enqueue(
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
        """Enqueues one job and returns it as stored.

        ``args`` is any JSON value. ``timeout`` (per attempt) and ``delay`` are seconds or
        timedeltas; ``run_at`` an aware datetime or RFC 3339 string. ``unique`` is
        ``{"key": …, "scope": "queued"|"active"|"period", "period": …}``: when another job
        holds the key, that job is returned instead. ``backoff`` is
        ``{"type": "exponential", "base_ms": …, "cap_ms": …}`` or
        ``{"type": "fixed", "delay_ms": …}``. ``meta`` is a JSON object of annotations (a
        trace id, say) up to 16 KiB, stored and returned as given and never read by Keel.
        With ``idempotency_key``, retrying the same request returns the original job instead
        of enqueuing a second one, which makes a retry after a :class:`keel.TransportError`
        safe.
        """
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
        if self._grpc is not None:
            return self._grpc.enqueue(body, idempotency_key)
        return self._call(p.enqueue(body, idempotency_key))

    def enqueue_many(
        self, jobs: Iterable[JobSpec], *, idempotency_key: Optional[str] = None
    ) -> List[Job]:
        """Enqueues 1 to 1000 jobs atomically (all or none), in order.

        Each job is a mapping of ``enqueue``'s arguments: ``{"kind": "x", "args": …,
        "queue": …}``.
        """
        if self._grpc is not None:
            return self._grpc.enqueue_many(p.batch_bodies(jobs), idempotency_key)
        return self._call(p.enqueue_many(jobs, idempotency_key))

    def get(self, id: str) -> Job:
        """The job ``id``; a ``404`` when it does not exist (or belongs to another tenant)."""
        return self._call(p.get(id))

    def result(self, id: str) -> JobResult:
        """The job's result once it completed (``.ready``), or just its state until then.

        A job that ended ``discarded`` or ``cancelled`` has no result: that raises a
        ``409`` :class:`keel.KeelError` (``slug == "job-not-completed"``) whose detail gives
        the last error.
        """
        return self._call(p.result(id))

    def cancel(self, id: str) -> Job:
        """Cancels a job that has not finished. A running job's lease is revoked, and its
        worker learns of it on its next heartbeat."""
        return self._call(p.cancel(id))

    def wait(self, id: str, timeout: Seconds = 60.0) -> Job:
        """Polls the job until it is ``completed``, ``discarded`` or ``cancelled``.

        Polls quickly at first, then at most once a second. Raises
        :class:`keel.WaitTimeout` (carrying the last state seen) after ``timeout``
        seconds.
        """
        limit = p.seconds_of(timeout, "timeout")
        deadline = time.monotonic() + limit
        delays = poll_delays()
        while True:
            job = self.get(id)
            if job.terminal:
                return job
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(f"job {id} is still {job.state} after {limit:g}s", job=job)
            time.sleep(min(next(delays), remaining))

    def list_jobs(
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
        return self._call(p.list_jobs(queue, state, kind, tenant, after, limit))

    def queues(self) -> List[QueueInfo]:
        """Every queue with jobs, sorted by name: paused or not, and its jobs by state."""
        return self._call(p.queues())

    def queue(self, name: str) -> QueueInfo:
        """One queue: paused or not, and its jobs by state, without counting the others.

        The same as its element of :meth:`queues`. Any valid name answers (a queue nobody
        used has zero counts); an invalid one is a ``400`` :class:`keel.KeelError`
        (``slug == "malformed-request"``). A tenant key counts only its own jobs.
        """
        return self._call(p.queue(name))

    def workers(self) -> List[WorkerInfo]:
        """The workers that leased or heartbeated through this server in the last 5 minutes."""
        return self._call(p.workers())

    # -- worker protocol -----------------------------------------------------------------

    def lease(
        self,
        queue: str,
        worker: str,
        max: int = 1,
        wait: Seconds = 0.0,
        lease: Seconds = 30.0,
        kinds: Optional[Sequence[str]] = None,
    ) -> List[Job]:
        """Leases up to ``max`` jobs of ``queue``, waiting up to ``wait`` seconds (at most 30)
        for the first. Each job's ``lease.token`` must be sent with its heartbeats and
        outcome. ``lease`` is how long each lease lasts without a heartbeat (5 s to 1 h)."""
        return self._call(p.lease(queue, worker, max, wait, lease, kinds))

    def heartbeat(self, id: str, token: str, lease: Optional[Seconds] = None) -> Heartbeat:
        """Renews a lease for ``lease`` seconds from now (server default 30 s).
        ``cancel_requested`` in the answer means the job was cancelled: stop working on it."""
        return self._call(p.heartbeat(id, token, lease))

    def complete(self, id: str, token: str, result: Any = None) -> Job:
        """Reports success with ``result`` (any JSON). ``409`` when the token is stale."""
        return self._call(p.complete(id, token, result))

    def fail(
        self,
        id: str,
        token: str,
        error: str,
        permanent: bool = False,
        retry_in: Optional[Seconds] = None,
    ) -> Job:
        """Reports a failed attempt: the job is ``retryable`` while attempts remain (after
        ``retry_in`` seconds if given, else its backoff), else ``discarded``. ``permanent``
        discards it at once."""
        return self._call(p.fail(id, token, error, permanent, retry_in))

    def release(self, id: str, token: str) -> Job:
        """Gives a leased job back unrun: it is ``available`` again and the attempt is not
        counted."""
        return self._call(p.release(id, token))

    def complete_many(self, outcomes: Sequence[Completion]) -> List[OutcomeResult]:
        """Reports 1 to 1000 completions in one request; one result per item, in order.
        A stale item does not fail the others: check each result's ``ok``."""
        return self._call(p.complete_many(outcomes))

    def fail_many(self, outcomes: Sequence[Failure]) -> List[OutcomeResult]:
        """Reports 1 to 1000 failures in one request; one result per item, in order."""
        return self._call(p.fail_many(outcomes))
