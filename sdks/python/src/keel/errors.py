"""What the SDK raises, and what a handler raises to steer its job.

Keel answers every error with an RFC 9457 ``application/problem+json`` body. :class:`KeelError`
carries that body's fields, so a caller can switch on ``status`` or ``slug`` (the stable last
segment of the problem ``type``) instead of parsing ``detail``, which is meant for humans.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Union

if TYPE_CHECKING:
    from .models import Job

__all__ = [
    "FieldError",
    "KeelError",
    "MissingDependency",
    "TransportError",
    "WaitTimeout",
    "PermanentError",
    "RetryIn",
]


@dataclass(frozen=True)
class FieldError:
    """One invalid field of a ``422``, e.g. ``priority`` or ``jobs[3].tags[0]``."""

    field: str
    message: str


class KeelError(Exception):
    """An error answered by Keel, or the failure to get an answer at all.

    ``status`` is the HTTP status (``None`` when no response arrived: see
    :class:`TransportError`). ``type``, ``title`` and ``detail`` come from the problem body;
    ``errors`` lists every bad field of a ``422``.
    """

    status: Optional[int]
    type: str
    title: str
    detail: str
    errors: List[FieldError]
    request_id: Optional[str]
    job_id: Optional[str]
    retry_after: Optional[float]
    body: Optional[Mapping[str, Any]]

    def __init__(
        self,
        detail: str,
        *,
        status: Optional[int] = None,
        type: str = "about:blank",
        title: str = "",
        errors: Optional[List[FieldError]] = None,
        request_id: Optional[str] = None,
        job_id: Optional[str] = None,
        retry_after: Optional[float] = None,
        body: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.errors = list(errors or [])
        self.request_id = request_id
        self.job_id = job_id
        self.retry_after = retry_after
        self.body = body

    @property
    def slug(self) -> str:
        """The last segment of ``type`` (``"not-found"``, ``"stale-lease"``, ``"validation"``…).

        Problem type URIs are stable, so this is what code should compare against.
        """
        return self.type.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        head = f"{self.status} {self.title}".strip() if self.status else ""
        text = f"{head}: {self.detail}" if head else self.detail
        if self.errors:
            text += "; " + "; ".join(f"{e.field}: {e.message}" for e in self.errors)
        return text

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(status={self.status!r}, type={self.type!r}, detail={self.detail!r})"

    @classmethod
    def from_problem(cls, status: int, problem: Mapping[str, Any]) -> "KeelError":
        """Builds the error from a problem document (also used for the items of a batch)."""
        raw_errors = problem.get("errors")
        errors: List[FieldError] = []
        if isinstance(raw_errors, list):
            for e in raw_errors:
                if isinstance(e, Mapping):
                    errors.append(FieldError(str(e.get("field", "")), str(e.get("message", ""))))
        raw_status = problem.get("status")
        return cls(
            str(problem.get("detail") or problem.get("title") or f"HTTP {status}"),
            status=raw_status if isinstance(raw_status, int) else status,
            type=str(problem.get("type") or "about:blank"),
            title=str(problem.get("title") or ""),
            errors=errors,
            request_id=_opt_str(problem.get("request_id")),
            job_id=_opt_str(problem.get("job_id")),
            body=problem,
        )


class TransportError(KeelError):
    """No answer from Keel: the connection failed, was reset, or timed out.

    The request may or may not have been acted on (an enqueue without an ``Idempotency-Key``
    might have been stored). The underlying exception (``httpx``'s, or ``grpc.RpcError``
    over the gRPC transport) is the ``__cause__``.
    """


class MissingDependency(KeelError, ImportError):
    """A feature was asked for whose optional packages are not installed, e.g. a
    ``grpc_target`` without ``keel-sdk[grpc]``.

    Raised when the client is made, not at its first call, so a missing install shows up
    at startup. It is an ``ImportError`` too, since that is what it is; ``status`` is
    ``None``, as nothing was sent.
    """


class WaitTimeout(KeelError):
    """:meth:`keel.Client.wait` gave up before the job reached a terminal state.

    ``job`` is the last state seen, so the caller can tell a stuck job from a slow one.
    """

    job: Optional["Job"]

    def __init__(self, detail: str, *, job: Optional["Job"] = None) -> None:
        super().__init__(detail, job_id=job.id if job is not None else None)
        self.job = job


class PermanentError(Exception):
    """Raised by a handler: the job cannot succeed, so discard it now.

    Retrying would only repeat the failure (bad input, a missing record), so the job is
    failed with ``permanent: true`` and goes to ``discarded`` whatever attempts remain.
    """


class RetryIn(Exception):
    """Raised by a handler: fail this attempt and run the job again after ``seconds``.

    Use it when the handler knows better than the job's backoff policy, e.g. an upstream
    answered ``429`` with ``Retry-After``. When no attempts remain the job is discarded.
    """

    seconds: float

    def __init__(self, seconds: Union[float, timedelta], message: str = "") -> None:
        secs = seconds.total_seconds() if isinstance(seconds, timedelta) else float(seconds)
        if secs < 0:
            raise ValueError("RetryIn needs a delay of 0 seconds or more")
        super().__init__(message or f"retry in {secs:g}s")
        self.seconds = secs


def _opt_str(v: Any) -> Optional[str]:
    return v if isinstance(v, str) else None
