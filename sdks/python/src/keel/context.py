"""What a handler is given besides its arguments: the job, a logger, and cancellation."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING, Any, MutableMapping, Optional, Tuple

from .models import Job

if TYPE_CHECKING:
    _Adapter = logging.LoggerAdapter[logging.Logger]
else:
    _Adapter = logging.LoggerAdapter

__all__ = ["Context"]


class _JobLogger(_Adapter):
    """Prefixes each message with the job it is about, and passes the same facts as
    ``extra`` (``keel_job_id``, ``keel_kind``, ``keel_attempt``) for structured handlers."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> Tuple[Any, MutableMapping[str, Any]]:
        facts = dict(self.extra or {})
        extra = kwargs.get("extra")
        if extra:
            facts.update(extra)
        kwargs["extra"] = facts
        return (
            f"[{facts['keel_kind']} {facts['keel_job_id']} attempt {facts['keel_attempt']}] {msg}",
            kwargs,
        )


class Context:
    """One attempt of one job, as its handler sees it.

    Cancellation is cooperative: when the job is cancelled (a user's
    ``POST /v1/jobs/{id}/cancel``, learnt on the next heartbeat), its lease is lost, or the
    worker's grace period ends, ``cancelled`` becomes True and both ``cancel_event`` (for
    plain handlers: ``ctx.cancel_event.wait(5)``) and :meth:`wait_cancelled` (for async
    handlers) fire. The handler should then stop; whatever it returns afterwards is not
    reported, because the job is no longer this worker's.
    """

    def __init__(self, job: Job, logger: logging.Logger) -> None:
        self._job = job
        self._event = threading.Event()
        # Created on the worker's loop, which is where it is awaited.
        self._async_event = asyncio.Event()
        self._reason: Optional[str] = None
        self._logger = _JobLogger(
            logger, {"keel_job_id": job.id, "keel_kind": job.kind, "keel_attempt": job.attempt}
        )

    @property
    def job(self) -> Job:
        """The job as leased (state ``running``, ``attempt`` already counted)."""
        return self._job

    @property
    def id(self) -> str:
        return self._job.id

    @property
    def attempt(self) -> int:
        """This attempt's number, from 1."""
        return self._job.attempt

    @property
    def queue(self) -> str:
        return self._job.queue

    @property
    def kind(self) -> str:
        return self._job.kind

    @property
    def logger(self) -> "logging.LoggerAdapter[logging.Logger]":
        """A logger (``keel.job``) whose lines name this job and attempt."""
        return self._logger

    @property
    def cancelled(self) -> bool:
        """True once the handler should stop (see the class docstring for when)."""
        return self._event.is_set()

    @property
    def cancel_reason(self) -> Optional[str]:
        """Why it was cancelled: ``"cancelled"``, ``"lease lost"`` or ``"shutdown"``."""
        return self._reason

    @property
    def cancel_event(self) -> threading.Event:
        """Set on cancellation; a plain handler can ``wait()`` on it with a timeout."""
        return self._event

    async def wait_cancelled(self) -> None:
        """Returns once the job is cancelled (for ``async def`` handlers only)."""
        await self._async_event.wait()

    def _cancel(self, reason: str) -> None:
        """Called on the worker's loop."""
        if self._reason is None:
            self._reason = reason
        self._event.set()
        self._async_event.set()

    def __repr__(self) -> str:
        return (
            f"Context(id={self.id!r}, kind={self.kind!r}, attempt={self.attempt}, "
            f"cancelled={self.cancelled})"
        )
