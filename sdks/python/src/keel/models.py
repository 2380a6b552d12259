"""Typed views of the JSON Keel answers with.

Each model keeps the decoded JSON it came from in ``raw``, so a field a newer server adds is
reachable before this SDK learns its name; unknown fields are never an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .errors import KeelError

__all__ = [
    "JobState",
    "TERMINAL_STATES",
    "AttemptError",
    "Lease",
    "Job",
    "JobResult",
    "JobPage",
    "Heartbeat",
    "OutcomeResult",
    "WorkerInfo",
    "QueueInfo",
    "parse_timestamp",
]

#: The states a job can be in (see docs/job-states.md). Kept as plain strings so a state a
#: newer server introduces does not break parsing.
JobState = str

#: States a job never leaves.
TERMINAL_STATES: Tuple[str, ...] = ("completed", "discarded", "cancelled")

_TS = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|z|[+-]\d{2}:?\d{2})?$"
)


def parse_timestamp(value: Any) -> Optional[datetime]:
    """Parses an RFC 3339 timestamp into an aware ``datetime`` (``None`` stays ``None``).

    ``datetime.fromisoformat`` accepts neither ``Z`` nor nine fractional digits before
    Python 3.11, and Keel may send both, so the fraction is cut to microseconds here.
    """
    if value is None:
        return None
    m = _TS.match(str(value))
    if m is None:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r}")
    date, clock, frac, zone = m.groups()
    micro = (frac or "0")[:6].ljust(6, "0")
    if zone is None or zone in ("Z", "z"):
        offset = "+00:00"
    elif ":" in zone:
        offset = zone
    else:
        offset = f"{zone[:3]}:{zone[3:]}"
    parsed = datetime.fromisoformat(f"{date}T{clock}.{micro}{offset}")
    return parsed if zone is not None else parsed.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class AttemptError:
    """One failed attempt, as stored in a job's ``errors``."""

    attempt: int
    at: Optional[datetime]
    message: str

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "AttemptError":
        return cls(
            int(d.get("attempt", 0)), parse_timestamp(d.get("at")), str(d.get("message", ""))
        )


@dataclass(frozen=True)
class Lease:
    """Who holds a running job and until when.

    ``token`` is only present in the answer to a lease request: it is the worker's proof of
    ownership, and every outcome must carry it.
    """

    owner: str
    expires_at: Optional[datetime]
    token: Optional[str] = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Lease":
        token = d.get("token")
        return cls(
            owner=str(d.get("owner", "")),
            expires_at=parse_timestamp(d.get("expires_at")),
            token=token if isinstance(token, str) else None,
        )


@dataclass(frozen=True)
class Job:
    """A job as ``GET /v1/jobs/{id}`` shows it."""

    id: str
    queue: str
    kind: str
    state: JobState
    attempt: int
    max_attempts: int
    args: Any
    result: Any
    errors: List[AttemptError]
    lease: Optional[Lease]
    tenant: str
    priority: int
    timeout_ms: int
    tags: List[str]
    backoff: Dict[str, Any]
    run_at: Optional[datetime]
    created_at: Optional[datetime]
    started_at: Optional[datetime]
    finished_at: Optional[datetime]
    unique: Optional[Dict[str, Any]]
    meta: Optional[Dict[str, Any]]
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Job":
        lease = d.get("lease")
        return cls(
            id=str(d["id"]),
            queue=str(d.get("queue", "")),
            kind=str(d.get("kind", "")),
            state=str(d.get("state", "")),
            attempt=int(d.get("attempt", 0)),
            max_attempts=int(d.get("max_attempts", 0)),
            args=d.get("args"),
            result=d.get("result"),
            errors=[AttemptError.from_json(e) for e in d.get("errors") or []],
            lease=Lease.from_json(lease) if isinstance(lease, Mapping) else None,
            tenant=str(d.get("tenant", "")),
            priority=int(d.get("priority", 0)),
            timeout_ms=int(d.get("timeout_ms", 0)),
            tags=[str(t) for t in d.get("tags") or []],
            backoff=dict(d.get("backoff") or {}),
            run_at=parse_timestamp(d.get("run_at")),
            created_at=parse_timestamp(d.get("created_at")),
            started_at=parse_timestamp(d.get("started_at")),
            finished_at=parse_timestamp(d.get("finished_at")),
            unique=dict(d["unique"]) if isinstance(d.get("unique"), Mapping) else None,
            meta=dict(d["meta"]) if isinstance(d.get("meta"), Mapping) else None,
            raw=dict(d),
        )

    @property
    def terminal(self) -> bool:
        """True once the job is ``completed``, ``discarded`` or ``cancelled``."""
        return self.state in TERMINAL_STATES

    @property
    def timeout(self) -> timedelta:
        """The per-attempt timeout."""
        return timedelta(milliseconds=self.timeout_ms)


@dataclass(frozen=True)
class JobPage:
    """One page of ``GET /v1/jobs``: jobs oldest first, and the cursor of the next page."""

    jobs: List[Job]
    next: Optional[str]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "JobPage":
        nxt = d.get("next")
        return cls(
            [Job.from_json(j) for j in d.get("jobs") or []], nxt if isinstance(nxt, str) else None
        )


@dataclass(frozen=True)
class JobResult:
    """``GET /v1/jobs/{id}/result``: the result once ``completed``, else just the state."""

    id: str
    state: JobState
    result: Any

    @property
    def ready(self) -> bool:
        """True when the job completed and ``result`` holds its result."""
        return self.state == "completed"

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "JobResult":
        return cls(str(d["id"]), str(d.get("state", "")), d.get("result"))


@dataclass(frozen=True)
class Heartbeat:
    """The answer to a heartbeat.

    ``cancel_requested`` is how a cancel reaches a remote worker: the job already ended as
    ``cancelled`` and its lease is revoked (``expires_at`` is then ``None``).
    """

    expires_at: Optional[datetime]
    cancel_requested: bool

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Heartbeat":
        return cls(parse_timestamp(d.get("expires_at")), bool(d.get("cancel_requested", False)))


@dataclass(frozen=True)
class OutcomeResult:
    """One item of the answer to ``POST /v1/jobs/complete`` or ``/v1/jobs/fail``.

    Each outcome of a batch is judged alone: on ``200``, ``state`` is the job's state now
    (``completed``, ``retryable`` or ``discarded``); on anything else ``error`` holds the
    item's problem (not raised), e.g. ``409 stale-lease``. ``job`` is set only if the
    server sends the whole job with the item.
    """

    id: str
    status: int
    state: Optional[JobState]
    error: Optional[KeelError]
    job: Optional[Job] = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "OutcomeResult":
        status = int(d.get("status", 0))
        raw_job = d.get("job")
        job = Job.from_json(raw_job) if isinstance(raw_job, Mapping) else None
        state = d.get("state")
        problem = d.get("problem")
        return cls(
            id=str(d.get("id", "")),
            status=status,
            state=str(state) if isinstance(state, str) else (job.state if job else None),
            error=KeelError.from_problem(status, problem) if isinstance(problem, Mapping) else None,
            job=job,
        )


@dataclass(frozen=True)
class WorkerInfo:
    """A worker seen by the server in the last 5 minutes (``GET /v1/workers``)."""

    id: str
    tenant: str
    queues: List[str]
    last_seen: Optional[datetime]
    jobs_held: int

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "WorkerInfo":
        return cls(
            id=str(d.get("id", "")),
            tenant=str(d.get("tenant", "")),
            queues=[str(q) for q in d.get("queues") or []],
            last_seen=parse_timestamp(d.get("last_seen")),
            jobs_held=int(d.get("jobs_held", 0)),
        )


@dataclass(frozen=True)
class QueueInfo:
    """A queue as ``GET /v1/queues`` shows it: whether it is paused, and its jobs by state."""

    queue: str
    paused: bool
    counts: Dict[str, int]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "QueueInfo":
        counts = d.get("counts") or {}
        return cls(
            queue=str(d.get("queue", "")),
            paused=bool(d.get("paused", False)),
            counts={str(k): int(v) for k, v in counts.items()},
        )
