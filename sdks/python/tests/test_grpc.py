"""The gRPC transport for enqueueing (``keel.Client(..., grpc_target=...)``): against a real
`keel serve`, the same jobs and the same errors as over HTTP; without one, the conversions
and the error mapping.

Each server test compares the two transports on one server: ``client`` speaks HTTP only,
``grpc_client`` enqueues over gRPC, and everything is read back over HTTP.
"""

from __future__ import annotations

import hashlib
import re
import socket
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import httpx
import pytest
from keel_server import KeelServer, ServerError
from support import jobs_in, require_module

import keel
from keel import _protocol as p

QUEUE = "py-grpc"

# Args whose text would not survive a re-encoding: key order, an integer above 2^53, a
# float, a non-ASCII string.
ARGS = {"b": 1, "a": 2**60 + 1, "f": 0.1, "s": "é"}


def args_text(server: KeelServer, id: str) -> str:
    """The job's ``args`` exactly as the HTTP API sends them, before any JSON decoding."""
    text = httpx.get(f"{server.url}/v1/jobs/{id}").text
    m = re.search(r'"args":(.*?),"priority":', text)
    assert m is not None, text
    return m.group(1)


# -- against a server -------------------------------------------------------------------


def test_enqueue_returns_the_job_http_shows(
    server: KeelServer, client: keel.Client, grpc_client: keel.Client
) -> None:
    options: Dict[str, Any] = dict(
        queue=QUEUE,
        priority=2,
        max_attempts=3,
        timeout=1.5,
        delay=timedelta(hours=1),
        tags=["a", "b"],
        meta={"trace": "t-1", "n": [1, 2]},
        backoff={"type": "fixed", "delay_ms": 250},
    )
    over_http = client.enqueue("noop", ARGS, unique={"key": "h", "scope": "active"}, **options)
    over_grpc = grpc_client.enqueue("noop", ARGS, unique={"key": "g", "scope": "active"}, **options)

    # Exactly what HTTP shows for it, down to the decoded JSON in `raw`.
    read_back = client.get(over_grpc.id)
    assert over_grpc == read_back
    assert over_grpc.raw == read_back.raw
    # The same shape as the job enqueued over HTTP: every member, every value but the
    # job's own (id, times, unique key).
    own = {"id", "run_at", "created_at", "unique"}
    assert over_grpc.raw.keys() == over_http.raw.keys()
    assert {k: v for k, v in over_grpc.raw.items() if k not in own} == {
        k: v for k, v in over_http.raw.items() if k not in own
    }
    assert (over_grpc.state, over_grpc.timeout_ms, over_grpc.priority) == ("scheduled", 1500, 2)
    assert over_grpc.unique == {"key": "g", "scope": "active"}
    assert list(over_grpc.args) == ["b", "a", "f", "s"] and over_grpc.args == ARGS

    # Stored byte for byte as the SDK writes it, over either transport.
    assert args_text(server, over_grpc.id) == args_text(server, over_http.id) == p.json_text(ARGS)


def test_enqueued_job_runs_and_reads_back_over_http(
    client: keel.Client, grpc_client: keel.Client
) -> None:
    job = grpc_client.enqueue("echo", {"hello": "world"})
    assert job.queue == "default" and job.meta is None and "meta" not in job.raw
    done = client.wait(job.id, timeout=60)
    assert (done.state, done.result) == ("completed", {"hello": "world"})
    # The gRPC client reads over HTTP too.
    assert grpc_client.get(job.id) == done


def test_a_held_unique_key_returns_the_holder_as_http_shows_it(
    client: keel.Client, grpc_client: keel.Client
) -> None:
    # A holder with a lease, an attempt error, then a result: every optional member of a job.
    unique = {"key": f"holder-{uuid.uuid4()}", "scope": "period", "period": timedelta(days=365)}
    holder = client.enqueue("task", {"n": 1}, queue=QUEUE, unique=unique)
    [first] = client.lease(QUEUE, "py-grpc", wait=5)
    assert first.lease is not None and first.lease.token is not None
    client.fail(first.id, first.lease.token, "boom", retry_in=0)
    [second] = client.lease(QUEUE, "py-grpc", wait=5)
    assert second.id == holder.id and second.lease is not None and second.lease.token

    running = grpc_client.enqueue("task", {"n": 2}, queue=QUEUE, unique=unique)
    assert running.id == holder.id and running.state == "running"
    assert running.lease is not None and running.lease.token is None
    assert [e.message for e in running.errors] == ["boom"]
    assert running.raw == client.get(holder.id).raw

    client.complete(second.id, second.lease.token, {"ok": [1, 2]})
    completed = grpc_client.enqueue("task", {"n": 3}, queue=QUEUE, unique=unique)
    assert (completed.id, completed.state, completed.result) == (
        holder.id,
        "completed",
        {"ok": [1, 2]},
    )
    assert completed.finished_at is not None and completed.lease is None
    assert completed.raw == client.get(holder.id).raw


def test_enqueue_many(server: KeelServer, client: keel.Client, grpc_client: keel.Client) -> None:
    specs: List[keel.JobSpec] = [
        {"kind": "noop", "queue": QUEUE, "args": {"i": i, **ARGS}, "delay": 3600} for i in range(3)
    ]
    specs[1]["meta"] = {"second": True}
    jobs = grpc_client.enqueue_many(specs)
    assert [j.args["i"] for j in jobs] == [0, 1, 2]
    assert [j.meta for j in jobs] == [None, {"second": True}, None]
    assert [j.raw for j in jobs] == [client.get(j.id).raw for j in jobs]
    assert [j.id for j in jobs_in(client, QUEUE)] == [j.id for j in jobs]
    assert args_text(server, jobs[0].id) == p.json_text({"i": 0, **ARGS})

    with pytest.raises(ValueError, match="1 to 1000"):
        grpc_client.enqueue_many([])


def test_idempotency_key_replays_and_creates_nothing(
    client: keel.Client, grpc_client: keel.Client
) -> None:
    key = f"py-{uuid.uuid4()}"
    first = grpc_client.enqueue("noop", {"n": 1}, queue=QUEUE, delay=3600, idempotency_key=key)
    again = grpc_client.enqueue("noop", {"n": 1}, queue=QUEUE, delay=3600, idempotency_key=key)
    assert again.id == first.id and again.raw == first.raw
    assert [j.id for j in jobs_in(client, QUEUE)] == [first.id]

    batch_key = f"py-{uuid.uuid4()}"
    specs: List[keel.JobSpec] = [{"kind": "noop", "queue": QUEUE, "delay": 3600}] * 3
    batch = grpc_client.enqueue_many(specs, idempotency_key=batch_key)
    replayed = grpc_client.enqueue_many(specs, idempotency_key=batch_key)
    assert [j.id for j in replayed] == [j.id for j in batch]
    assert len(jobs_in(client, QUEUE)) == 4

    # The same key with another request: the same 409 as over HTTP.
    http_key = f"py-{uuid.uuid4()}"
    client.enqueue("noop", {"n": 1}, queue=QUEUE, delay=3600, idempotency_key=http_key)
    errors = []
    for c, k in ((grpc_client, key), (client, http_key)):
        with pytest.raises(keel.KeelError) as raised:
            c.enqueue("noop", {"n": 2}, queue=QUEUE, delay=3600, idempotency_key=k)
        errors.append(raised.value)
    over_grpc, over_http = errors
    assert type(over_grpc) is type(over_http) is keel.KeelError
    assert (over_grpc.status, over_grpc.slug) == (over_http.status, over_http.slug)
    assert (over_grpc.status, over_grpc.slug) == (409, "idempotency-key-reused")
    assert over_grpc.request_id and key in over_grpc.detail
    assert len(jobs_in(client, QUEUE)) == 5


def raised_by(call: Callable[[keel.Client], Any], *clients: keel.Client) -> List[keel.KeelError]:
    out = []
    for c in clients:
        with pytest.raises(keel.KeelError) as raised:
            call(c)
        out.append(raised.value)
    return out


INVALID: Sequence[Tuple[str, Callable[[keel.Client], Any]]] = [
    (
        "refused by the server",
        lambda c: c.enqueue("noop", {}, priority=10, max_attempts=0, timeout=10**7),
    ),
    (
        "refused by the server, in a batch",
        lambda c: c.enqueue_many(
            [{"kind": "noop"}, {"kind": "noop", "tags": ["x" * 500], "timeout": 10**7}]
        ),
    ),
    (
        "not carried by a gRPC message",
        lambda c: c.enqueue(
            "noop",
            priority=-1,
            run_at="tomorrow",
            unique={"key": "k", "period": "1 hour"},
            backoff={"type": "exponential", "base_ms": 5},
        ),
    ),
]


@pytest.mark.parametrize("case", [name for name, _ in INVALID])
def test_validation_errors_are_the_same_as_over_http(
    case: str, client: keel.Client, grpc_client: keel.Client
) -> None:
    call = dict(INVALID)[case]
    over_grpc, over_http = raised_by(call, grpc_client, client)
    assert type(over_grpc) is type(over_http) is keel.KeelError
    assert (over_grpc.status, over_grpc.slug, over_grpc.type) == (
        over_http.status,
        over_http.slug,
        over_http.type,
    )
    assert over_grpc.status == 422 and over_grpc.slug == "validation"
    # The HTTP body's names (`timeout_ms`), not the message's (`timeout`).
    assert sorted(e.field for e in over_grpc.errors) == sorted(e.field for e in over_http.errors)
    assert all(e.message for e in over_grpc.errors)
    assert len(jobs_in(client, "default")) == 0


def test_too_large_a_request_is_the_same_status_as_over_http(
    client: keel.Client, grpc_client: keel.Client
) -> None:
    # Over the server's 2 MiB message cap (KEEL_MAX_BODY_BYTES), not only its cap on args.
    big = "x" * 3_000_000
    over_grpc, over_http = raised_by(lambda c: c.enqueue("noop", big), grpc_client, client)
    assert over_grpc.status == over_http.status == 413


@pytest.fixture
def keyed_server(keel_bin: Path, database_url: str) -> Iterator[KeelServer]:
    """A server that accepts one API key, for tenant ``acme``."""
    digest = hashlib.sha256(b"py-secret").hexdigest()
    try:
        srv = KeelServer(keel_bin, database_url, env={"KEEL_API_KEYS": f"acme={digest}"})
    except ServerError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, f"keel serve exited {code} after SIGTERM:\n{srv.output()}"


def test_api_key_travels_as_over_http(keyed_server: KeelServer) -> None:
    require_module("grpc", "'keel-sdk[grpc]'")
    url, target = keyed_server.url, keyed_server.grpc_target

    def pair(key: str) -> Tuple[keel.Client, keel.Client]:
        return keel.Client(url, api_key=key, grpc_target=target), keel.Client(url, api_key=key)

    grpc_client, client = pair("py-secret")
    with grpc_client, client:
        job = grpc_client.enqueue("noop", queue=QUEUE, delay=3600)
        assert job.tenant == "acme" and client.get(job.id) == job

        forbidden = raised_by(lambda c: c.enqueue("noop", tenant="other"), grpc_client, client)
        assert [(e.status, e.slug) for e in forbidden] == [(403, "forbidden")] * 2

    grpc_client, client = pair("wrong")
    with grpc_client, client:
        unauthorized = raised_by(lambda c: c.enqueue("noop"), grpc_client, client)
        assert [(e.status, e.slug) for e in unauthorized] == [(401, "unauthorized")] * 2


# -- without a server --------------------------------------------------------------------


def test_nothing_listening_is_a_transport_error() -> None:
    require_module("grpc", "'keel-sdk[grpc]'")
    import grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The port is free again, and nothing listens on it.
    with keel.Client("http://127.0.0.1:1", timeout=5, grpc_target=f"127.0.0.1:{port}") as c:
        with pytest.raises(keel.TransportError) as raised:
            c.enqueue("noop")
    assert raised.value.status is None
    assert "keel.v1.JobService/Enqueue" in str(raised.value)
    assert isinstance(raised.value.__cause__, grpc.RpcError)


def test_missing_grpcio_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # `import grpc` fails as it does when grpcio is not installed.
    monkeypatch.setitem(sys.modules, "grpc", None)
    with pytest.raises(keel.MissingDependency, match=r"pip install 'keel-sdk\[grpc\]'") as raised:
        keel.Client("http://127.0.0.1:1", grpc_target="127.0.0.1:50051")
    assert isinstance(raised.value, ImportError) and isinstance(raised.value, keel.KeelError)
    assert raised.value.status is None
    # HTTP alone needs nothing more.
    keel.Client("http://127.0.0.1:1").close()


@pytest.mark.parametrize("target", ["http://127.0.0.1:50051", "", " "])
def test_grpc_target_must_be_a_target(target: str) -> None:
    with pytest.raises(ValueError, match="grpc_target"):
        keel.Client("http://127.0.0.1:1", grpc_target=target)


def test_the_stubs_are_package_relative_and_serve_keel_v1() -> None:
    require_module("grpc", "'keel-sdk[grpc]'")
    from keel._grpc import keel_v1_pb2, keel_v1_pb2_grpc

    assert keel_v1_pb2.DESCRIPTOR.package == "keel.v1"
    methods = keel_v1_pb2.DESCRIPTOR.services_by_name["JobService"].methods_by_name
    assert {"Enqueue", "EnqueueBatch"} <= set(methods)
    assert "keel_v1_pb2" not in sys.modules, "the service module imported its messages top-level"
    assert keel_v1_pb2_grpc.keel__v1__pb2 is keel_v1_pb2


class FakeCall(Exception):
    """What grpc raises for a failed call: its code, message and metadata."""

    def __init__(self, code: str, details: str, trailing: Sequence[Tuple[str, Any]] = ()) -> None:
        import grpc

        super().__init__(details)
        self._code = getattr(grpc.StatusCode, code)
        self._details = details
        self._trailing = tuple(trailing)

    def code(self) -> Any:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Tuple[Tuple[str, Any], ...]:
        return self._trailing

    def initial_metadata(self) -> Tuple[Tuple[str, Any], ...]:
        return ()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: Any) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def status_bin(code: int, message: str, *details: Tuple[str, bytes]) -> bytes:
    """A serialised google.rpc.Status with ``(type name, message bytes)`` details."""
    out = _field(1, code) + _field(2, message)
    for name, value in details:
        any_ = _field(1, f"type.googleapis.com/google.rpc.{name}") + _field(2, value)
        out += _field(3, any_)
    return out


def error_info(reason: str, **metadata: str) -> Tuple[str, bytes]:
    body = _field(1, reason) + _field(2, "keel.dev")
    for k, v in metadata.items():
        body += _field(3, _field(1, k) + _field(2, v))
    return "ErrorInfo", body


def test_grpc_errors_become_the_http_errors() -> None:
    require_module("grpc", "'keel-sdk[grpc]'")
    from keel._grpc_transport import error_of

    def err(call: FakeCall) -> keel.KeelError:
        return error_of(call, "keel.v1.JobService/Enqueue", "127.0.0.1:1")

    retry = ("RetryInfo", _field(1, _field(1, 3) + _field(2, 500_000_000)))
    shed = err(
        FakeCall(
            "UNAVAILABLE",
            "the server is at its concurrency limit; retry shortly",
            [
                ("grpc-status-details-bin", status_bin(14, "…", error_info("overloaded"), retry)),
                ("x-request-id", "r-1"),
            ],
        )
    )
    assert not isinstance(shed, keel.TransportError)
    assert (shed.status, shed.slug, shed.title, shed.retry_after, shed.request_id) == (
        503,
        "overloaded",
        "Service Unavailable",
        3.5,
        "r-1",
    )

    bad = ("BadRequest", _field(1, _field(1, "jobs[2].timeout") + _field(2, "too long")))
    invalid = err(
        FakeCall(
            "INVALID_ARGUMENT",
            "the request is invalid (1 error)",
            [("grpc-status-details-bin", status_bin(3, "…", error_info("validation"), bad))],
        )
    )
    assert (invalid.status, invalid.type) == (422, "https://keel.dev/problems/validation")
    assert [(e.field, e.message) for e in invalid.errors] == [("jobs[2].timeout_ms", "too long")]

    job_id = str(uuid.uuid4())
    gone = err(
        FakeCall(
            "FAILED_PRECONDITION",
            "cancelled",
            [
                (
                    "grpc-status-details-bin",
                    status_bin(9, "…", error_info("job-not-completed", job_id=job_id, state="x")),
                )
            ],
        )
    )
    assert (gone.status, gone.slug, gone.job_id, gone.detail) == (
        409,
        "job-not-completed",
        job_id,
        "cancelled",
    )

    # No answer from Keel: the connection failed or the call's own deadline passed.
    for code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        assert isinstance(err(FakeCall(code, "failed to connect")), keel.TransportError)
    # Answered by grpc itself or a proxy, or with details that do not decode: by the code.
    too_big = err(FakeCall("OUT_OF_RANGE", "decoded message length too large"))
    assert (too_big.status, too_big.type, too_big.detail) == (
        413,
        "about:blank",
        "decoded message length too large",
    )
    garbled = err(FakeCall("NOT_FOUND", "gone", [("grpc-status-details-bin", b"\x1a\xff")]))
    assert (garbled.status, garbled.errors) == (404, [])
    assert err(FakeCall("INTERNAL", "")).status == 500
    assert err(FakeCall("ALREADY_EXISTS", "used")).status == 409
    assert err(FakeCall("RESOURCE_EXHAUSTED", "slow down")).status == 429


def test_a_message_job_renders_as_http_renders_it() -> None:
    require_module("grpc", "'keel-sdk[grpc]'")
    from keel._grpc import keel_v1_pb2 as pb
    from keel._grpc_transport import job_json

    m = pb.Job(id="j", queue="q", kind="k", tenant="t", args='{"b": 1,  "a": 2}', state=42)
    m.run_at.seconds = 1_900_000_000
    m.created_at.seconds, m.created_at.nanos = 1_900_000_000, 500_000_000
    m.started_at.seconds, m.started_at.nanos = 1_900_000_000, 123_456_789
    m.lease.owner = "w"
    m.lease.expires_at.seconds, m.lease.expires_at.nanos = 1_900_000_000, 123_456_000
    d = job_json(pb, m)
    assert list(d["args"]) == ["b", "a"]
    assert d["state"] == "42"  # a state these stubs do not know
    assert d["backoff"] == {}
    assert (d["run_at"], d["created_at"], d["started_at"]) == (
        "2030-03-17T17:46:40Z",
        "2030-03-17T17:46:40.500Z",
        "2030-03-17T17:46:40.123456789Z",
    )
    assert d["lease"] == {"owner": "w", "expires_at": "2030-03-17T17:46:40.123456Z"}
    assert d["result"] is None and d["finished_at"] is None
    assert "unique" not in d and "meta" not in d
    assert keel.Job.from_json(d).started_at is not None
