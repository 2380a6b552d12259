"""Tests that need no server: wire conversions, parsing, validation, local machinery."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, List

import pytest
from keel_server import serving_addr, serving_fields

import keel
from keel import _protocol as p
from keel._backoff import Backoff, poll_delays
from keel._batcher import Batcher
from keel._pace import Pace
from keel._threads import DaemonPool
from keel.models import parse_timestamp

# -- the job body -----------------------------------------------------------------------


def test_job_body_converts_durations_and_leaves_defaults_out() -> None:
    body = p.job_body(
        "send",
        {"to": "a@b"},
        queue="emails",
        timeout=1.5,
        delay=timedelta(minutes=2),
        tags=("x",),
        unique={"key": "k", "scope": "period", "period": timedelta(hours=1)},
        backoff={"type": "fixed", "delay_ms": 100},
    )
    assert body == {
        "kind": "send",
        "args": {"to": "a@b"},
        "queue": "emails",
        "timeout_ms": 1500,
        "delay_ms": 120_000,
        "tags": ["x"],
        "unique": {"key": "k", "scope": "period", "period": 3_600_000},
        "backoff": {"type": "fixed", "delay_ms": 100},
    }
    assert p.job_body("noop") == {"kind": "noop", "args": None}


def test_run_at_must_be_aware() -> None:
    aware = datetime(2030, 1, 2, 3, 4, 5, 600_000, tzinfo=timezone(timedelta(hours=2)))
    assert p.job_body("k", run_at=aware)["run_at"] == "2030-01-02T01:04:05.600000Z"
    assert p.job_body("k", run_at="2030-01-01T00:00:00Z")["run_at"] == "2030-01-01T00:00:00Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        p.job_body("k", run_at=datetime(2030, 1, 1))


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), timedelta(seconds=-1)])
def test_negative_or_infinite_durations_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError):
        p.job_body("k", delay=bad)


def test_tags_must_be_a_list() -> None:
    with pytest.raises(TypeError):
        p.job_body("k", tags="urgent")


@pytest.mark.parametrize("bad", [[1, 2], "trace", 7])
def test_meta_must_be_a_mapping(bad: Any) -> None:
    assert p.job_body("k", meta={"trace": "t-1"})["meta"] == {"trace": "t-1"}
    with pytest.raises(TypeError, match="meta"):
        p.job_body("k", meta=bad)
    with pytest.raises(TypeError, match="meta"):
        p.spec_body({"kind": "k", "meta": bad})


def test_worker_protocol_bodies() -> None:
    lease = p.lease("q", "w:1", 4, 10, timedelta(seconds=30), ["a", "b"])
    assert (lease.method, lease.path) == ("POST", "/v1/queues/q/lease")
    assert json.loads(lease.content() or b"") == {
        "worker": "w:1",
        "max": 4,
        "wait": "10000ms",
        "lease": "30000ms",
        "kinds": ["a", "b"],
    }
    assert lease.extra_timeout == 10

    fail = p.fail_many([{"id": "1", "token": "t", "error": "e", "retry_in": 2.5}])
    assert json.loads(fail.content() or b"") == {
        "outcomes": [
            {"id": "1", "token": "t", "error": "e", "permanent": False, "retry_in": "2500ms"}
        ]
    }
    done = p.complete_many([{"id": "1", "token": "t"}])
    assert json.loads(done.content() or b"") == {
        "outcomes": [{"id": "1", "token": "t", "result": None}]
    }
    with pytest.raises(ValueError):
        p.complete_many([])
    # Path segments are escaped, whatever a caller passes.
    assert p.get("../x").path == "/v1/jobs/..%2Fx"


def test_bodies_refuse_nan() -> None:
    with pytest.raises(ValueError):
        p.complete("1", "t", float("nan")).content()


# -- answers --------------------------------------------------------------------------------


def test_timestamps_parse_to_aware_datetimes() -> None:
    assert parse_timestamp("2026-12-04T10:00:30.123456789Z") == datetime(
        2026, 12, 4, 10, 0, 30, 123456, tzinfo=timezone.utc
    )
    assert parse_timestamp("2026-12-04T10:00:30Z") == datetime(
        2026, 12, 4, 10, 0, 30, tzinfo=timezone.utc
    )
    assert parse_timestamp("2026-12-04T12:00:30.5+02:00") == datetime(
        2026, 12, 4, 10, 0, 30, 500000, tzinfo=timezone.utc
    )
    assert parse_timestamp(None) is None
    with pytest.raises(ValueError):
        parse_timestamp("yesterday")


def test_job_from_json_keeps_unknown_fields_in_raw() -> None:
    job = keel.Job.from_json(
        {
            "id": "0193",
            "queue": "billing",
            "kind": "invoice.render",
            "tenant": "default",
            "args": {"invoice": 42},
            "priority": 4,
            "state": "running",
            "attempt": 1,
            "max_attempts": 25,
            "timeout_ms": 1800000,
            "backoff": {"type": "exponential", "base_ms": 1000, "cap_ms": 3600000},
            "tags": [],
            "run_at": "2026-12-04T10:00:00Z",
            "errors": [{"attempt": 1, "at": "2026-12-04T10:00:01Z", "message": "boom"}],
            "result": None,
            "lease": {"token": "5b0c", "owner": "w:1", "expires_at": "2026-12-04T10:00:30.000000Z"},
            "created_at": "2026-12-04T09:59:59Z",
            "started_at": None,
            "finished_at": None,
            "something_new": 7,
        }
    )
    assert job.lease is not None and job.lease.token == "5b0c" and job.lease.owner == "w:1"
    assert job.errors[0].message == "boom" and job.errors[0].attempt == 1
    assert job.timeout == timedelta(minutes=30)
    assert not job.terminal
    assert job.raw["something_new"] == 7
    assert job.meta is None
    with_meta = keel.Job.from_json({**job.raw, "meta": {"trace": "t-1", "n": [1, 2]}})
    assert with_meta.meta == {"trace": "t-1", "n": [1, 2]}


def test_problem_documents_become_errors() -> None:
    err = keel.KeelError.from_problem(
        422,
        {
            "type": "https://keel.dev/problems/validation",
            "title": "Unprocessable Entity",
            "status": 422,
            "detail": "the request is invalid (2 errors)",
            "request_id": "r-1",
            "errors": [
                {"field": "priority", "message": "must be 0 to 9"},
                {"field": "max_attempts", "message": "must be 1 to 1000"},
            ],
        },
    )
    assert err.status == 422 and err.slug == "validation" and err.request_id == "r-1"
    assert err.errors == [
        keel.FieldError("priority", "must be 0 to 9"),
        keel.FieldError("max_attempts", "must be 1 to 1000"),
    ]
    assert "priority: must be 0 to 9" in str(err)


def test_outcome_results_carry_the_problem_of_each_item() -> None:
    r = keel.OutcomeResult.from_json(
        {
            "id": "1",
            "status": 409,
            "problem": {
                "type": "https://keel.dev/problems/stale-lease",
                "title": "Conflict",
                "status": 409,
                "detail": "cancelled",
            },
        }
    )
    assert not r.ok and r.state is None and r.error is not None and r.error.slug == "stale-lease"
    ok = keel.OutcomeResult.from_json({"id": "2", "status": 200, "state": "retryable"})
    assert ok.ok and ok.state == "retryable" and ok.error is None


def test_serving_line_is_found_in_both_layouts() -> None:
    flat = (
        '{"level":"INFO","message":"keel is serving","addr":"127.0.0.1:43567","admin_addr":"off"'
        ',"grpc_addr":"127.0.0.1:45557"}'
    )
    nested = '{"level":"INFO","fields":{"message":"keel is serving","addr":"127.0.0.1:8080"}}'
    assert serving_addr(flat) == "127.0.0.1:43567"
    assert serving_addr(nested) == "127.0.0.1:8080"
    flat_fields = serving_fields(flat)
    assert flat_fields is not None and flat_fields["grpc_addr"] == "127.0.0.1:45557"
    assert serving_addr('{"message":"shutdown requested: draining"}') is None
    assert serving_addr("keel is serving on 127.0.0.1:1") is None


# -- clients without a server ------------------------------------------------------------


def test_transport_error_when_nothing_listens() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The port is free again, and nothing listens on it.
    with keel.Client(f"http://127.0.0.1:{port}", timeout=5) as client:
        with pytest.raises(keel.TransportError) as raised:
            client.get(str(uuid.uuid4()))
    assert raised.value.status is None
    assert isinstance(raised.value, keel.KeelError)
    assert isinstance(raised.value.__cause__, Exception)


def test_client_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        keel.Client("localhost:8080")
    with pytest.raises(ValueError):
        keel.Client("http://x", timeout=0)
    c = keel.Client("http://127.0.0.1:1/", api_key="secret")
    try:
        assert c.url == "http://127.0.0.1:1"
        assert "secret" not in repr(c.config)
    finally:
        c.close()


# -- worker configuration -----------------------------------------------------------------


def test_worker_settings_are_checked() -> None:
    url = "http://127.0.0.1:1"
    with pytest.raises(ValueError):
        keel.Worker(url, queues=[])
    with pytest.raises(ValueError):
        keel.Worker(url, queues=["q"], concurrency=0)
    with pytest.raises(ValueError):
        keel.Worker(url, queues=["q"], lease=2)
    with pytest.raises(ValueError):
        keel.Worker(url, queues=["q"], lease=30, heartbeat_interval=30)
    with pytest.raises(ValueError):
        keel.Worker(url, queues=["q"], worker_id="has space")
    bad_prefetch: List[Any] = [-1, keel.Worker.MAX_PREFETCH + 1, 1.5, True]
    for bad in bad_prefetch:
        with pytest.raises(ValueError, match="prefetch"):
            keel.Worker(url, queues=["q"], prefetch=bad)
    assert keel.Worker(url, queues=["q"], prefetch=0).prefetch == 0
    assert keel.Worker(url, queues=["q"]).prefetch == keel.Worker.DEFAULT_PREFETCH == 256
    w = keel.Worker(url, queues="q", lease=30)
    assert w.queues == ["q"]
    assert ":" in w.worker_id

    @w.handler("a")
    def a(ctx: keel.Context, args: Any) -> Any:
        return None

    with pytest.raises(ValueError, match="already registered"):
        w.register("a", a)
    assert w.kinds == ["a"]


def test_worker_without_handlers_refuses_to_run() -> None:
    w = keel.Worker("http://127.0.0.1:1", queues=["q"])
    with pytest.raises(RuntimeError, match="handler"):
        w.run()


def test_stop_before_run_makes_run_return() -> None:
    # Nothing listens on the URL: run() must not need the server to honour an early stop.
    w = keel.Worker("http://127.0.0.1:1", queues=["q"], grace=0)
    w.register("a", lambda ctx, args: None)
    w.stop()
    w.run()


# -- local machinery --------------------------------------------------------------------------


def test_backoff_is_capped_jittered_and_never_zero() -> None:
    b = Backoff(base=0.2, cap=10.0)
    delays = [b.next() for _ in range(50)]
    assert all(0.1 <= d <= 10.0 for d in delays)
    assert max(delays[-10:]) >= 5.0
    b.reset()
    assert b.next() <= 0.2
    first = list(zip(range(20), poll_delays()))
    assert first[0][1] == 0.05 and max(d for _, d in first) == 1.0


def test_batcher_sends_what_arrives_together_in_one_request() -> None:
    calls: List[List[int]] = []

    async def send(items: List[int]) -> List[keel.OutcomeResult]:
        calls.append(list(items))
        return [keel.OutcomeResult(str(i), 200, "completed", None) for i in items]

    async def main() -> None:
        batcher: Batcher[int] = Batcher(send, window=0.05)
        futures = [await batcher.submit(i) for i in range(5)]
        first = await asyncio.gather(*futures)
        assert [r.id for r in first] == ["0", "1", "2", "3", "4"]
        await (await batcher.submit(9))
        await batcher.drain()

    asyncio.run(main())
    assert calls == [[0, 1, 2, 3, 4], [9]]


def test_batcher_hands_a_failed_request_to_every_item() -> None:
    async def send(items: List[int]) -> List[keel.OutcomeResult]:
        raise keel.TransportError("connection refused")

    async def main() -> None:
        batcher: Batcher[int] = Batcher(send, window=0)
        futures = [await batcher.submit(1), await batcher.submit(2)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(r, keel.TransportError) for r in results)

    asyncio.run(main())


def test_batcher_makes_submitters_wait_while_full() -> None:
    answer = asyncio.Event()
    calls: List[List[int]] = []

    async def send(items: List[int]) -> List[keel.OutcomeResult]:
        calls.append(list(items))
        await answer.wait()
        return [keel.OutcomeResult(str(i), 200, "completed", None) for i in items]

    async def main() -> None:
        batcher: Batcher[int] = Batcher(send, window=0, limit=2)
        first = [await batcher.submit(1), await batcher.submit(2)]
        third = asyncio.ensure_future(batcher.submit(3))
        await asyncio.sleep(0.05)
        # Two items unanswered: the third submitter waits (a worker's slot would too).
        assert not third.done() and batcher.unanswered == 2 and calls == [[1, 2]]
        answer.set()
        assert [r.id for r in await asyncio.gather(*first)] == ["1", "2"]
        assert (await (await third)).id == "3"
        assert batcher.unanswered == 0

    asyncio.run(main())
    assert calls == [[1, 2], [3]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pace_buffers_a_few_round_trips_of_starts() -> None:
    clock = FakeClock()
    pace = Pace(256, clock)
    assert pace.prefetch() == 1  # nothing measured yet: one job ahead
    # 1000 jobs/s for a few windows, with leases taking 10 ms.
    for _ in range(20):
        clock.now += 0.05
        pace.started(50)
        pace.leased(0.010)
    assert pace.rate == pytest.approx(1000, rel=0.01)
    assert pace.rtt == pytest.approx(0.010, rel=0.02)
    assert pace.prefetch() == 40  # ceil(1000/s × 10 ms × 4)
    # Starts within a window shorter than 50 ms do not move the rate.
    clock.now += 0.01
    pace.started(500)
    assert pace.rate == pytest.approx(1000, rel=0.01)
    # The cap bounds it.
    assert Pace(16, clock).prefetch() == 1
    capped = Pace(16, clock)
    capped.rate, capped.rtt = 1e6, 1.0
    assert capped.prefetch() == 16


def test_pace_forgets_the_rate_after_a_quiet_window() -> None:
    clock = FakeClock()
    pace = Pace(256, clock)
    pace.rate, pace.rtt = 5000.0, 0.01
    assert pace.prefetch() == 200
    # A window of 200 ms or more replaces the average outright: an idle worker does not
    # keep a large buffer.
    clock.now += 0.5
    pace.started(0)
    assert pace.rate == 0.0 and pace.prefetch() == 1
    # A short window averages with the previous rate instead.
    pace.rate = 1000.0
    clock.now += 0.1
    pace.started(0)
    assert pace.rate == pytest.approx(500.0)


def test_pace_with_prefetch_off_holds_nothing_ahead() -> None:
    pace = Pace(0, FakeClock())
    pace.rate, pace.rtt = 1e6, 1.0
    assert pace.prefetch() == 0
    with pytest.raises(ValueError):
        Pace(-1, FakeClock())


def test_pace_slow_start_doubles_the_floor_while_full_leases_find_the_slots_starving() -> None:
    clock = FakeClock()
    pace = Pace(256, clock)
    assert pace.prefetch() == 1  # nothing measured yet
    seen = []
    for _ in range(10):
        pace.answered(True, True)
        seen.append(pace.prefetch())
    # No rate measured (the clock never moves): the prefetch is the floor, up to the cap.
    assert pace.rate == 0.0
    assert seen == [1, 2, 4, 8, 16, 32, 64, 128, 256, 256]
    assert pace.floor == 256
    # A cap that is no power of two still bounds the floor.
    odd = Pace(20, clock)
    seen = []
    for _ in range(7):
        odd.answered(True, True)
        seen.append(odd.prefetch())
    assert seen == [1, 2, 4, 8, 16, 20, 20]
    # A measured rate above the floor still wins.
    pace.floor = 2
    pace.rate, pace.rtt = 1000.0, 0.01
    assert pace.prefetch() == 40


def test_pace_slow_start_halves_once_the_slots_have_work_or_a_lease_comes_short() -> None:
    pace = Pace(256, FakeClock())
    for _ in range(9):
        pace.answered(True, True)
    assert pace.prefetch() == 256
    pace.answered(True, False)  # full, but the slots still had work in hand
    assert pace.floor == 128 and pace.prefetch() == 128
    pace.answered(False, True)  # fewer jobs than asked: no backlog to chase
    assert pace.floor == 64 and pace.prefetch() == 64
    pace.answered(False, False)
    assert pace.floor == 32 and pace.prefetch() == 32
    for _ in range(10):
        pace.answered(False, False)
    assert pace.floor == 0 and pace.prefetch() == 1  # back to the measured pace
    # From a floor of 0, a starving full answer starts again at 1.
    pace.answered(True, True)
    assert pace.floor == 1


def test_pace_slow_start_with_prefetch_off_holds_nothing_ahead() -> None:
    off = Pace(0, FakeClock())
    for _ in range(5):
        off.answered(True, True)
        assert off.prefetch() == 0
    assert off.floor == 1  # clamped to max(cap, 1), as in Rust; prefetch() stays 0


def test_daemon_pool_runs_calls_on_daemon_threads() -> None:
    pool = DaemonPool(2, "t")
    seen: List[bool] = []

    def where() -> str:
        seen.append(threading.current_thread().daemon)
        return threading.current_thread().name

    names = {pool.submit(where).result(5) for _ in range(6)}
    assert names <= {"t-0", "t-1"} and all(seen)
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(5)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(where)


def test_retry_in_takes_seconds_or_a_timedelta() -> None:
    assert keel.RetryIn(timedelta(minutes=1)).seconds == 60
    assert str(keel.RetryIn(5, "busy")) == "busy"
    with pytest.raises(ValueError):
        keel.RetryIn(-1)
