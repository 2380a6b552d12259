"""The HTTP API as data: every call is built here once and sent by either client.

:class:`keel.Client` and :class:`keel.AsyncClient` differ only in how they send a request, so
each API call is described by a :class:`Call` (method, path, body, which statuses are
success, how to read the answer) and both clients share this one description. That keeps the
wire format (docs/workers.md, the job body of crates/keel-api/src/job_in.rs) in one place.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import (
    Any,
    Callable,
    Dict,
    FrozenSet,
    Generic,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    TypedDict,
    TypeVar,
    Union,
)
from urllib.parse import quote, urlencode

import httpx

from .errors import KeelError
from .models import Heartbeat, Job, JobPage, JobResult, OutcomeResult, QueueInfo, WorkerInfo

T = TypeVar("T")

#: A duration: seconds as a number, or a ``timedelta``.
Seconds = Union[int, float, timedelta]

#: Most outcomes (and most jobs of a lease) the server takes in one request.
MAX_BATCH = 1000

__all__ = [
    "Call",
    "Completion",
    "Failure",
    "JobSpec",
    "Seconds",
    "MAX_BATCH",
]


class _CompletionRequired(TypedDict):
    id: str
    token: str


class Completion(_CompletionRequired, total=False):
    """One item of :meth:`keel.Client.complete_many`."""

    result: Any


class _FailureRequired(TypedDict):
    id: str
    token: str
    error: str


class Failure(_FailureRequired, total=False):
    """One item of :meth:`keel.Client.fail_many`; ``retry_in`` in seconds or a timedelta."""

    permanent: bool
    retry_in: Optional[Seconds]


class _JobSpecRequired(TypedDict):
    kind: str


class JobSpec(_JobSpecRequired, total=False):
    """One job of :meth:`keel.Client.enqueue_many`: the keyword arguments of ``enqueue``."""

    args: Any
    queue: str
    priority: int
    max_attempts: int
    timeout: Seconds
    run_at: Union[datetime, str]
    delay: Seconds
    tags: Sequence[str]
    meta: Mapping[str, Any]
    unique: Mapping[str, Any]
    backoff: Mapping[str, Any]
    tenant: str


_NO_BODY: Any = object()


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request and how to read its answer.

    ``extra_timeout`` is added to the client's timeout: a lease long-polls for up to its
    ``wait`` before answering, and that wait must not count against the network timeout.
    """

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    body: Any = _NO_BODY
    headers: Mapping[str, str] = field(default_factory=dict)
    ok: FrozenSet[int] = frozenset({200})
    extra_timeout: float = 0.0

    def content(self) -> Optional[bytes]:
        """The body as JSON bytes; ``NaN`` and infinities are refused, as JSON has neither."""
        if self.body is _NO_BODY:
            return None
        return json_text(self.body).encode()

    def request_headers(self) -> Dict[str, str]:
        out = dict(self.headers)
        if self.body is not _NO_BODY:
            out.setdefault("content-type", "application/json")
        return out


# ---------------------------------------------------------------------------------------
# Values


def json_text(value: Any) -> str:
    """``value`` as compact JSON text, as every body is sent. The gRPC transport sends
    ``args`` and ``meta`` as text fields written by this same function, so Keel stores the
    same bytes whichever transport enqueued the job."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def seconds_of(value: Seconds, name: str) -> float:
    """A duration argument in seconds, refusing negatives and non-finite numbers."""
    if isinstance(value, timedelta):
        secs = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        secs = float(value)
    else:
        raise TypeError(
            f"{name} must be seconds (a number) or a timedelta, not {type(value).__name__}"
        )
    if not math.isfinite(secs) or secs < 0:
        raise ValueError(f"{name} must be a finite, non-negative duration, got {value!r}")
    return secs


def millis(value: Seconds, name: str) -> int:
    """A duration as whole milliseconds (rounded), as the job body's ``*_ms`` fields take."""
    return int(round(seconds_of(value, name) * 1000))


def duration(value: Seconds, name: str) -> str:
    """A duration as the worker protocol writes it: a string with a unit, e.g. ``"1500ms"``."""
    return f"{millis(value, name)}ms"


def timestamp(value: Union[datetime, str], name: str) -> str:
    """An RFC 3339 timestamp. A naive ``datetime`` is refused: its zone would be a guess."""
    if isinstance(value, str):
        return value
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime or an RFC 3339 string")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (e.g. datetime.now(timezone.utc))")
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _segment(value: str) -> str:
    return quote(str(value), safe="")


def job_body(
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
) -> Dict[str, Any]:
    """The JSON body of one job; ``None`` means "the server's default" and is left out."""
    body: Dict[str, Any] = {"kind": kind, "args": args}
    if queue is not None:
        body["queue"] = queue
    if tenant is not None:
        body["tenant"] = tenant
    if priority is not None:
        body["priority"] = priority
    if max_attempts is not None:
        body["max_attempts"] = max_attempts
    if timeout is not None:
        body["timeout_ms"] = millis(timeout, "timeout")
    if run_at is not None:
        body["run_at"] = timestamp(run_at, "run_at")
    if delay is not None:
        body["delay_ms"] = millis(delay, "delay")
    if tags is not None:
        if isinstance(tags, str):
            raise TypeError("tags must be a list of strings, not one string")
        body["tags"] = list(tags)
    if meta is not None:
        if not isinstance(meta, Mapping):
            raise TypeError(f"meta must be a mapping (a JSON object), not {type(meta).__name__}")
        body["meta"] = dict(meta)
    if unique is not None:
        u = dict(unique)
        if isinstance(u.get("period"), timedelta):
            u["period"] = millis(u["period"], "unique.period")
        body["unique"] = u
    if backoff is not None:
        body["backoff"] = dict(backoff)
    return body


def spec_body(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """The body of one :class:`JobSpec`, with the same conversions as ``enqueue``."""
    spec = dict(spec)
    try:
        kind = spec.pop("kind")
    except KeyError:
        raise ValueError("every job needs a kind") from None
    args = spec.pop("args", None)
    return job_body(kind, args, **spec)


# ---------------------------------------------------------------------------------------
# Answers


def error_from_response(resp: httpx.Response) -> KeelError:
    """The :class:`KeelError` of a non-success answer, from its problem body when it has one.

    A proxy in between may answer with HTML or nothing, so anything that is not a JSON
    object still yields an error carrying the status and a bounded excerpt of the body.
    """
    reason = resp.reason_phrase or ""
    retry_after = _retry_after(resp.headers.get("retry-after"))
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, Mapping):
        return problem_error(resp.status_code, body, reason, retry_after)
    text = resp.text.strip()
    return KeelError(
        text[:500] or reason or f"HTTP {resp.status_code}",
        status=resp.status_code,
        title=reason,
        retry_after=retry_after,
    )


def problem_error(
    status: int, problem: Mapping[str, Any], reason: str, retry_after: Optional[float]
) -> KeelError:
    """The :class:`KeelError` of a problem document, whichever transport brought it: the
    gRPC transport rebuilds the document from the status and its details, so an error reads
    the same over both."""
    err = KeelError.from_problem(status, problem)
    if not err.title:
        err.title = reason
    err.retry_after = retry_after
    return err


def _retry_after(value: Optional[str]) -> Optional[float]:
    """``Retry-After`` in seconds; Keel sends whole seconds (the date form is not used)."""
    if value is None:
        return None
    try:
        secs = float(value)
    except ValueError:
        return None
    return secs if math.isfinite(secs) and secs >= 0 else None


def decode(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError as e:
        raise KeelError(
            f"{resp.request.method} {resp.request.url.path}: the answer is not JSON: {e}",
            status=resp.status_code,
        ) from e


def _job(resp: httpx.Response) -> Job:
    return Job.from_json(decode(resp))


def _jobs(resp: httpx.Response) -> List[Job]:
    return [Job.from_json(j) for j in decode(resp).get("jobs") or []]


def _outcomes(resp: httpx.Response) -> List[OutcomeResult]:
    return [OutcomeResult.from_json(r) for r in decode(resp).get("results") or []]


def _page(resp: httpx.Response) -> JobPage:
    return JobPage.from_json(decode(resp))


def _result(resp: httpx.Response) -> JobResult:
    return JobResult.from_json(decode(resp))


def _heartbeat(resp: httpx.Response) -> Heartbeat:
    return Heartbeat.from_json(decode(resp))


def _queue(resp: httpx.Response) -> QueueInfo:
    return QueueInfo.from_json(decode(resp))


def _queues(resp: httpx.Response) -> List[QueueInfo]:
    return [QueueInfo.from_json(q) for q in decode(resp)]


def _workers(resp: httpx.Response) -> List[WorkerInfo]:
    return [WorkerInfo.from_json(w) for w in decode(resp).get("workers") or []]


# ---------------------------------------------------------------------------------------
# Calls


def enqueue(body: Dict[str, Any], idempotency_key: Optional[str]) -> Call[Job]:
    # 201 when created; 200 when a unique key returned the job that holds it.
    headers = {"idempotency-key": idempotency_key} if idempotency_key is not None else {}
    return Call("POST", "/v1/jobs", _job, body, headers, frozenset({200, 201}))


def batch_bodies(specs: Iterable[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The bodies of an ``enqueue_many``, refusing an empty or oversized batch."""
    jobs = [spec_body(s) for s in specs]
    if not 1 <= len(jobs) <= MAX_BATCH:
        raise ValueError(f"enqueue_many takes 1 to {MAX_BATCH} jobs, got {len(jobs)}")
    return jobs


def enqueue_many(
    specs: Iterable[Mapping[str, Any]], idempotency_key: Optional[str]
) -> Call[List[Job]]:
    jobs = batch_bodies(specs)
    headers = {"idempotency-key": idempotency_key} if idempotency_key is not None else {}
    return Call("POST", "/v1/jobs/batch", _jobs, {"jobs": jobs}, headers, frozenset({200, 201}))


def get(id: str) -> Call[Job]:
    return Call("GET", f"/v1/jobs/{_segment(id)}", _job)


def list_jobs(
    queue: Optional[str],
    state: Optional[str],
    kind: Optional[str],
    tenant: Optional[str],
    after: Optional[str],
    limit: Optional[int],
) -> Call[JobPage]:
    params = {"queue": queue, "state": state, "kind": kind, "tenant": tenant, "after": after}
    query = [(k, v) for k, v in params.items() if v is not None]
    if limit is not None:
        query.append(("limit", str(int(limit))))
    path = "/v1/jobs" + ("?" + urlencode(query) if query else "")
    return Call("GET", path, _page)


def result(id: str) -> Call[JobResult]:
    # 202 while the job is on its way: not an error, just not ready.
    return Call("GET", f"/v1/jobs/{_segment(id)}/result", _result, ok=frozenset({200, 202}))


def cancel(id: str) -> Call[Job]:
    return Call("POST", f"/v1/jobs/{_segment(id)}/cancel", _job)


def queue(name: str) -> Call[QueueInfo]:
    return Call("GET", f"/v1/queues/{_segment(name)}", _queue)


def queues() -> Call[List[QueueInfo]]:
    return Call("GET", "/v1/queues", _queues)


def workers() -> Call[List[WorkerInfo]]:
    return Call("GET", "/v1/workers", _workers)


def lease(
    queue: str,
    worker: str,
    max: int,
    wait: Seconds,
    lease_for: Seconds,
    kinds: Optional[Sequence[str]],
) -> Call[List[Job]]:
    body: Dict[str, Any] = {
        "worker": worker,
        "max": max,
        "wait": duration(wait, "wait"),
        "lease": duration(lease_for, "lease"),
    }
    if kinds is not None:
        if isinstance(kinds, str):
            raise TypeError("kinds must be a list of kind names, not one string")
        body["kinds"] = list(kinds)
    return Call(
        "POST",
        f"/v1/queues/{_segment(queue)}/lease",
        _jobs,
        body,
        extra_timeout=seconds_of(wait, "wait"),
    )


def heartbeat(id: str, token: str, lease_for: Optional[Seconds]) -> Call[Heartbeat]:
    body: Dict[str, Any] = {"token": token}
    if lease_for is not None:
        body["lease"] = duration(lease_for, "lease")
    return Call("POST", f"/v1/jobs/{_segment(id)}/heartbeat", _heartbeat, body)


def complete(id: str, token: str, result: Any) -> Call[Job]:
    return Call(
        "POST", f"/v1/jobs/{_segment(id)}/complete", _job, {"token": token, "result": result}
    )


def fail(
    id: str, token: str, error: str, permanent: bool, retry_in: Optional[Seconds]
) -> Call[Job]:
    return Call(
        "POST",
        f"/v1/jobs/{_segment(id)}/fail",
        _job,
        _failure_fields(token, error, permanent, retry_in),
    )


def release(id: str, token: str) -> Call[Job]:
    return Call("POST", f"/v1/jobs/{_segment(id)}/release", _job, {"token": token})


def complete_many(outcomes: Sequence[Completion]) -> Call[List[OutcomeResult]]:
    items = [{"id": o["id"], "token": o["token"], "result": o.get("result")} for o in outcomes]
    return Call("POST", "/v1/jobs/complete", _outcomes, {"outcomes": _bounded(items)})


def fail_many(outcomes: Sequence[Failure]) -> Call[List[OutcomeResult]]:
    items = []
    for o in outcomes:
        item: Dict[str, Any] = {"id": o["id"]}
        item.update(
            _failure_fields(o["token"], o["error"], o.get("permanent", False), o.get("retry_in"))
        )
        items.append(item)
    return Call("POST", "/v1/jobs/fail", _outcomes, {"outcomes": _bounded(items)})


def _failure_fields(
    token: str, error: str, permanent: bool, retry_in: Optional[Seconds]
) -> Dict[str, Any]:
    body: Dict[str, Any] = {"token": token, "error": str(error), "permanent": bool(permanent)}
    if retry_in is not None:
        body["retry_in"] = duration(retry_in, "retry_in")
    return body


def _bounded(items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    if not 1 <= len(items) <= MAX_BATCH:
        raise ValueError(f"a batch of outcomes holds 1 to {MAX_BATCH} items, got {len(items)}")
    return items
