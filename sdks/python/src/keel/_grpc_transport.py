"""Enqueueing over gRPC: ``keel.v1.JobService/Enqueue`` and ``/EnqueueBatch``, for a
:class:`keel.Client` made with a ``grpc_target``.

The client builds each job's JSON body exactly as for HTTP (``_protocol.job_body``, with its
checks and conversions), and this module turns that body into a ``JobSpec`` and the answer's
``Job`` back into the JSON the HTTP API would have sent, so both transports give the same
:class:`keel.Job` (``raw`` included) and the same errors:

- ``args`` and ``meta`` are JSON text written by ``_protocol.json_text``, the function that
  writes HTTP bodies, so Keel stores the same bytes either way.
- A gRPC error is rebuilt into the problem document HTTP would have answered, from its code
  and the ``ErrorInfo`` (the problem type's slug), ``BadRequest`` (the invalid fields) and
  ``RetryInfo`` details, and raised through the same constructor. Field names are the HTTP
  body's (``timeout_ms``, not the message's ``timeout``).
- A value the message cannot carry (a negative ``priority``, an unparsable ``run_at`` or
  ``unique.period``) is refused before sending, with the ``422`` the server answers it
  with over HTTP, under the same field names.

grpcio and protobuf are optional (``keel-sdk[grpc]``): they are imported when a transport is
made, never when this module is.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from . import _protocol as p
from ._config import USER_AGENT, ClientConfig
from ._grpc_status import StatusDetails, status_details
from .errors import KeelError, MissingDependency, TransportError
from .models import Job

__all__ = ["GrpcTransport", "check_target"]

#: Prefix of every problem ``type`` URI; ``ErrorInfo.reason`` is its last segment.
PROBLEM_TYPE_BASE = "https://keel.dev/problems/"
#: ``ErrorInfo.domain`` of every error Keel itself answers.
ERROR_DOMAIN = "keel.dev"

#: The HTTP status of each problem type, as the server classifies its errors
#: (crates/keel-api/src/error.rs, ``ApiError::classify``).
_SLUG_STATUS: Dict[str, int] = {
    "malformed-request": 400,
    "invalid-query": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not-found": 404,
    "method-not-allowed": 405,
    "request-timeout": 408,
    "illegal-transition": 409,
    "conflict": 409,
    "stale-lease": 409,
    "queue-served-here": 409,
    "idempotency-key-reused": 409,
    "job-not-completed": 409,
    "payload-too-large": 413,
    "unsupported-media-type": 415,
    "validation": 422,
    "unprocessable": 422,
    "rate-limited": 429,
    "internal": 500,
    "unavailable": 503,
    "overloaded": 503,
    "deadline-exceeded": 504,
}

#: The HTTP status of a gRPC code, for an error without Keel's ``ErrorInfo`` (one the gRPC
#: library or a proxy answered), following docs/grpc.md's table.
_CODE_STATUS: Dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 409,
    "ABORTED": 409,
    # The server's one use of it: a message over its size limit (KEEL_MAX_BODY_BYTES),
    # which HTTP answers with 413.
    "OUT_OF_RANGE": 413,
    "RESOURCE_EXHAUSTED": 429,
    "UNIMPLEMENTED": 501,
    "UNKNOWN": 500,
    "INTERNAL": 500,
    "DATA_LOSS": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

#: Codes that, without Keel's ``ErrorInfo``, mean no answer came from Keel: the connection
#: failed, or the call's own deadline passed. As over HTTP, that is a TransportError: the
#: request may or may not have been acted on.
_NO_ANSWER = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"})

#: The titles the server gives its problems (the HTTP reason phrases).
_TITLES: Dict[int, str] = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

#: A gRPC field name that differs from the HTTP body's: ``JobSpec``'s durations.
_HTTP_FIELD = {"timeout": "timeout_ms", "delay": "delay_ms"}

_UINT32 = 2**32 - 1
_UINT64 = 2**64 - 1
_MAX_DURATION_SECONDS = 315_576_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|z|[+-]\d{2}:\d{2})$"
)
_PERIOD = re.compile(r"(?:\d+(?:ms|s|m|h|d))+")
_PERIOD_PART = re.compile(r"(\d+)(ms|s|m|h|d)")
_PERIOD_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
# The server's messages for the values it refuses in the same way.
_TIMESTAMP_SYNTAX = "must be an RFC 3339 timestamp, e.g. 2030-01-01T00:00:00Z"
_DURATION_SYNTAX = (
    "must be a duration: whole milliseconds, or a string of numbers with units ms, s, m, "
    'h, d, such as "500ms", "30s", "1h" or "1h30m"'
)


def check_target(target: Any) -> str:
    """``grpc_target`` as given, refusing what is not a gRPC target (a URL, say)."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError(
            f"grpc_target must be a gRPC target such as '127.0.0.1:50051', got {target!r}"
        )
    if target.startswith(("http://", "https://")):
        raise ValueError(
            f"grpc_target is a gRPC target (host:port, such as '127.0.0.1:50051', or a "
            f"dns:/// or unix: URI), not a URL: {target!r}"
        )
    return target


def _load() -> Tuple[Any, Any, Any]:
    """grpc and the generated modules, or :class:`MissingDependency` saying what to install."""
    try:
        import grpc

        from ._grpc import keel_v1_pb2, keel_v1_pb2_grpc
    except ImportError as e:
        raise MissingDependency(
            f"grpc_target needs the SDK's gRPC extra (grpcio and protobuf), which is not "
            f"installed ({e}): pip install 'keel-sdk[grpc]'"
        ) from e
    return grpc, keel_v1_pb2, keel_v1_pb2_grpc


class GrpcTransport:
    """One channel to ``target`` and the JobService calls the client sends over it.

    The channel is encrypted when the client's URL is ``https://`` (the HTTP API is then
    behind TLS, and the API key must not travel in the clear to the gRPC one), plaintext
    otherwise. It trusts grpcio's default roots, or, when the client has a ``ca_cert``,
    only that file's certificates: grpcio takes one set of root certificates and cannot add
    some to its defaults. A channel is thread-safe, like the HTTP pool beside it.
    """

    def __init__(self, target: str, config: ClientConfig) -> None:
        self.target = check_target(target)
        grpc, pb, services = _load()
        self._grpc = grpc
        self._pb = pb
        options = [
            ("grpc.primary_user_agent", USER_AGENT),
            # As over HTTP, an answer is not capped: a batch of 1000 jobs echoes their args.
            ("grpc.max_receive_message_length", -1),
        ]
        if config.tls:
            roots = config.ca_pem.encode("latin-1") if config.ca_pem is not None else None
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = services.JobServiceStub(self._channel)
        self._timeout = config.timeout
        self._metadata: Tuple[Tuple[str, str], ...] = (
            (("authorization", f"Bearer {config.api_key}"),) if config.api_key else ()
        )

    def close(self) -> None:
        self._channel.close()

    def enqueue(self, body: Mapping[str, Any], idempotency_key: Optional[str]) -> Job:
        problems = _Problems("")
        spec = _job_spec(self._pb, body, problems)
        problems.raise_any()
        request = self._pb.EnqueueRequest(job=spec)
        answer = self._send("Enqueue", self._stub.Enqueue, request, idempotency_key)
        return job_of(self._pb, answer.job)

    def enqueue_many(
        self, bodies: Sequence[Mapping[str, Any]], idempotency_key: Optional[str]
    ) -> List[Job]:
        specs = []
        problems = _Problems("")
        for i, body in enumerate(bodies):
            problems.prefix = f"jobs[{i}]."
            specs.append(_job_spec(self._pb, body, problems))
        problems.raise_any()
        request = self._pb.EnqueueBatchRequest(jobs=specs)
        answer = self._send("EnqueueBatch", self._stub.EnqueueBatch, request, idempotency_key)
        return [job_of(self._pb, j) for j in answer.jobs]

    def _send(self, name: str, method: Any, request: Any, idempotency_key: Optional[str]) -> Any:
        metadata = self._metadata
        if idempotency_key is not None:
            metadata += (("idempotency-key", idempotency_key),)
        try:
            return method(request, timeout=self._timeout, metadata=metadata)
        except self._grpc.RpcError as e:
            raise error_of(e, f"keel.v1.JobService/{name}", self.target) from e


# ---------------------------------------------------------------------------------------
# Errors


def error_of(e: Any, method: str, target: str) -> KeelError:
    """The :class:`KeelError` HTTP would have raised for the error ``e`` of a call."""
    code = getattr(_ask(e, "code"), "name", "UNKNOWN")
    message = _ask(e, "details") or ""
    details = StatusDetails()
    request_id: Optional[str] = None
    metadata = [*(_ask(e, "trailing_metadata") or ()), *(_ask(e, "initial_metadata") or ())]
    for key, value in metadata:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            details = status_details(value)
        elif key == "x-request-id" and isinstance(value, str) and request_id is None:
            request_id = value
    from_keel = details.domain == ERROR_DOMAIN and bool(details.reason)
    if not from_keel and code in _NO_ANSWER:
        return TransportError(f"{method} at {target} failed: {code}: {message or 'no answer'}")
    slug = details.reason if from_keel else None
    status = _SLUG_STATUS.get(slug or "") or _CODE_STATUS.get(code, 500)
    if status == 400 and details.violations:
        status = 422
    title = _TITLES.get(status, "")
    problem: Dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + slug if slug else "about:blank",
        "title": title,
        "status": status,
        "detail": message or f"{method} failed: {code}",
        "errors": [{"field": http_field(f), "message": m} for f, m in details.violations],
    }
    if request_id is not None:
        problem["request_id"] = request_id
    for key in ("job_id", "state"):
        if key in details.metadata:
            problem[key] = details.metadata[key]
    return p.problem_error(status, problem, title, details.retry_delay)


def _ask(e: Any, name: str) -> Any:
    """What the call ``e`` says about itself; ``None`` from an ``RpcError`` that is not a
    call (grpc raises those only for calls, but an error path must not fail)."""
    getter = getattr(e, name, None)
    return getter() if callable(getter) else None


def http_field(grpc_field: str) -> str:
    """A field path as the HTTP body names it: ``jobs[2].timeout`` is ``jobs[2].timeout_ms``."""
    prefix, dot, last = grpc_field.rpartition(".")
    return f"{prefix}{dot}{_HTTP_FIELD.get(last, last)}"


class _Problems:
    """The invalid fields found while building messages, named as HTTP names them."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.list: List[Dict[str, str]] = []

    def add(self, field: str, message: str) -> None:
        self.list.append({"field": self.prefix + field, "message": message})

    def raise_any(self) -> None:
        if not self.list:
            return
        n = len(self.list)
        title = _TITLES[422]
        problem = {
            "type": PROBLEM_TYPE_BASE + "validation",
            "title": title,
            "status": 422,
            "detail": f"the request is invalid ({n} error{'' if n == 1 else 's'}); "
            "refused before sending, as a gRPC message cannot carry these values",
            "errors": self.list,
        }
        raise p.problem_error(422, problem, title, None)


# ---------------------------------------------------------------------------------------
# Requests


def _job_spec(pb: Any, body: Mapping[str, Any], problems: _Problems) -> Any:
    """The ``JobSpec`` of one job body, as ``_protocol.job_body`` made it."""
    spec = pb.JobSpec(args=p.json_text(body.get("args")))
    kind = _string(body.get("kind"), "kind", problems)
    if kind is not None:
        spec.kind = kind
    for name in ("queue", "tenant"):
        if name in body:
            value = _string(body[name], name, problems)
            if value is not None:
                setattr(spec, name, value)
    for name in ("priority", "max_attempts"):
        if name in body:
            number = _uint(body[name], name, _UINT32, problems)
            if number is not None:
                setattr(spec, name, number)
    if "timeout_ms" in body:
        _set_duration(spec.timeout, body["timeout_ms"], "timeout_ms", problems)
    if "delay_ms" in body:
        _set_duration(spec.delay, body["delay_ms"], "delay_ms", problems)
    if "run_at" in body:
        _set_timestamp(spec.run_at, body["run_at"], "run_at", problems)
    if "tags" in body:
        tags = body["tags"]
        if all(isinstance(t, str) for t in tags):
            spec.tags.extend(tags)
        else:
            problems.add("tags", "must be a list of strings")
    if "meta" in body:
        spec.meta = p.json_text(body["meta"])
    if "unique" in body:
        _set_unique(spec.unique, body["unique"], problems)
    if "backoff" in body:
        _set_backoff(spec.backoff, body["backoff"], problems)
    return spec


def _string(value: Any, field: str, problems: _Problems) -> Optional[str]:
    if isinstance(value, str):
        return value
    problems.add(field, f"must be a string, not {type(value).__name__}")
    return None


def _uint(value: Any, field: str, top: int, problems: _Problems) -> Optional[int]:
    """A whole number from 0 to ``top``; a float that is one counts, as it does in JSON."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.add(field, f"must be an integer, not {type(value).__name__}")
        return None
    if isinstance(value, float):
        if not value.is_integer():
            problems.add(field, f"must be an integer, got {value!r}")
            return None
    number = int(value)
    if number < 0:
        problems.add(field, f"must not be negative, got {number}")
        return None
    if number > top:
        problems.add(field, f"must be at most {top}, got {number}")
        return None
    return number


def _set_duration(target: Any, ms: Any, field: str, problems: _Problems) -> None:
    """Whole milliseconds into a Duration, set even when zero (the server refuses a zero
    timeout, and must see it to)."""
    number = _uint(ms, field, _UINT64, problems)
    if number is None:
        return
    seconds, millis = divmod(number, 1000)
    # A Duration holds at most 10 000 years; the server's own bounds are far below that.
    if seconds > _MAX_DURATION_SECONDS:
        problems.add(field, f"is out of range, got {number} ms")
        return
    target.SetInParent()
    target.seconds = seconds
    target.nanos = millis * 1_000_000


def _set_timestamp(target: Any, value: Any, field: str, problems: _Problems) -> None:
    """An RFC 3339 string (``_protocol.timestamp`` writes datetimes as one), to the
    nanosecond it gives."""
    m = _RFC3339.match(value) if isinstance(value, str) else None
    if m is None:
        problems.add(field, _TIMESTAMP_SYNTAX)
        return
    date, clock, frac, zone = m.groups()
    offset = "+00:00" if zone in ("Z", "z") else zone
    try:
        at = datetime.fromisoformat(f"{date}T{clock}{offset}")
    except ValueError:
        problems.add(field, _TIMESTAMP_SYNTAX)
        return
    since = at - _EPOCH
    target.SetInParent()
    target.seconds = since.days * 86_400 + since.seconds
    target.nanos = int((frac or "0")[:9].ljust(9, "0"))


def _set_unique(target: Any, value: Any, problems: _Problems) -> None:
    if not isinstance(value, Mapping):
        problems.add("unique", f"must be an object, not {type(value).__name__}")
        return
    target.SetInParent()
    for name in value:
        if name not in ("key", "scope", "period"):
            problems.add(f"unique.{name}", "unknown field; expected one of key, scope, period")
    for name in ("key", "scope"):
        if value.get(name) is None:
            problems.add(f"unique.{name}", "is required")
            continue
        text = _string(value[name], f"unique.{name}", problems)
        if text is not None:
            setattr(target, name, text)
    period = value.get("period")
    if period is None:
        return
    ms = _period_ms(period)
    if ms is None:
        problems.add("unique.period", _DURATION_SYNTAX)
    else:
        _set_duration(target.period, ms, "unique.period", problems)


def _period_ms(value: Any) -> Optional[int]:
    """``unique.period`` in milliseconds: a whole number of them, or a string with units
    (``"1h30m"``), read as the server reads it over HTTP; ``None`` when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float):
        return int(value) if value.is_integer() and 0 <= value < 2**53 else None
    if isinstance(value, str) and _PERIOD.fullmatch(value.strip()):
        parts = _PERIOD_PART.findall(value.strip())
        return sum(int(n) * _PERIOD_UNIT_MS[unit] for n, unit in parts)
    return None


def _set_backoff(target: Any, value: Any, problems: _Problems) -> None:
    if not isinstance(value, Mapping):
        problems.add("backoff", f"must be an object, not {type(value).__name__}")
        return
    kind = value.get("type")
    fields: Tuple[str, ...]
    if kind == "exponential":
        fields = ("base_ms", "cap_ms")
        policy = target.exponential
    elif kind == "fixed":
        fields = ("delay_ms",)
        policy = target.fixed
    elif kind is None:
        problems.add("backoff", "missing field `type`")
        return
    else:
        problems.add("backoff", f"unknown variant `{kind}`, expected `exponential` or `fixed`")
        return
    # Other members are ignored, as the server ignores them over HTTP.
    numbers = {}
    for name in fields:
        if value.get(name) is None:
            problems.add("backoff", f"missing field `{name}`")
            continue
        number = _uint(value[name], "backoff", _UINT64, problems)
        if number is not None:
            numbers[name] = number
    if len(numbers) == len(fields):
        policy.SetInParent()
        for name, number in numbers.items():
            setattr(policy, name, number)


# ---------------------------------------------------------------------------------------
# Answers


def job_of(pb: Any, m: Any) -> Job:
    """The :class:`Job` of a ``keel.v1.Job``, through the JSON HTTP renders it as."""
    return Job.from_json(job_json(pb, m))


def job_json(pb: Any, m: Any) -> Dict[str, Any]:
    """``m`` as the HTTP API renders a job (``JobOut``): the same members in the same
    order, null where HTTP writes null and absent where HTTP leaves a member out."""
    out: Dict[str, Any] = {
        "id": m.id,
        "queue": m.queue,
        "kind": m.kind,
        "tenant": m.tenant,
        "args": json.loads(m.args) if m.args else None,
        "priority": m.priority,
        "state": _state(pb, m.state),
        "attempt": m.attempt,
        "max_attempts": m.max_attempts,
        "timeout_ms": _ms(m.timeout),
        "backoff": _backoff(m.backoff),
        "tags": list(m.tags),
        "run_at": _time(m, "run_at"),
        "errors": [
            {"attempt": e.attempt, "at": _time(e, "at"), "message": e.message} for e in m.errors
        ],
        "result": json.loads(m.result) if m.HasField("result") else None,
        "lease": None,
        "created_at": _time(m, "created_at"),
        "started_at": _time(m, "started_at"),
        "finished_at": _time(m, "finished_at"),
    }
    if m.HasField("lease"):
        lease: Dict[str, Any] = {}
        if m.lease.HasField("token"):
            lease["token"] = m.lease.token
        lease["owner"] = m.lease.owner
        lease["expires_at"] = _time(m.lease, "expires_at")
        out["lease"] = lease
    if m.HasField("unique"):
        out["unique"] = {"key": m.unique.key, "scope": m.unique.scope}
    if m.HasField("meta"):
        out["meta"] = json.loads(m.meta)
    return out


def _state(pb: Any, number: int) -> str:
    """``JOB_STATE_RUNNING`` is ``running``; a state these stubs do not know keeps its number,
    as a state unknown to the SDK is kept as the server's string over HTTP."""
    try:
        name: str = pb.JobState.Name(number)
    except ValueError:
        return str(number)
    return name[len("JOB_STATE_") :].lower()


def _ms(d: Any) -> int:
    return int(d.seconds) * 1000 + int(d.nanos) // 1_000_000


def _backoff(b: Any) -> Dict[str, Any]:
    policy = b.WhichOneof("policy")
    if policy == "exponential":
        e = b.exponential
        return {"type": "exponential", "base_ms": e.base_ms, "cap_ms": e.cap_ms}
    if policy == "fixed":
        return {"type": "fixed", "delay_ms": b.fixed.delay_ms}
    return {}


def _time(m: Any, name: str) -> Optional[str]:
    """A Timestamp as HTTP writes times: RFC 3339 in UTC with 0, 3, 6 or 9 fraction digits,
    the fewest that keep its precision (chrono's default, which the server uses)."""
    if not m.HasField(name):
        return None
    t = getattr(m, name)
    at = _EPOCH + timedelta(seconds=int(t.seconds))
    nanos = int(t.nanos)
    if nanos == 0:
        frac = ""
    elif nanos % 1_000_000 == 0:
        frac = f".{nanos // 1_000_000:03d}"
    elif nanos % 1_000 == 0:
        frac = f".{nanos // 1_000:06d}"
    else:
        frac = f".{nanos:09d}"
    return (
        f"{at.year:04d}-{at.month:02d}-{at.day:02d}T"
        f"{at.hour:02d}:{at.minute:02d}:{at.second:02d}{frac}Z"
    )
