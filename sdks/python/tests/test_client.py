"""The clients against a real `keel serve`: errors, the job calls, the worker protocol calls.

Jobs of the built-in kinds (`echo`, …) on the `default` queue are run by the server itself
(KEEL_QUEUES=default:4), so these tests need no worker.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from keel_server import KeelServer
from support import DEADLINE

import keel

QUEUE = "py-work"


def test_unknown_job_is_a_404(client: keel.Client) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(keel.KeelError) as raised:
        client.get(missing)
    err = raised.value
    assert err.status == 404
    assert err.slug == "not-found"
    assert missing in err.detail
    assert not isinstance(err, keel.TransportError)


def test_invalid_enqueue_is_a_422_naming_every_field(client: keel.Client) -> None:
    with pytest.raises(keel.KeelError) as raised:
        client.enqueue("echo", {}, priority=10, max_attempts=0, tags=["x" * 500])
    err = raised.value
    assert err.status == 422
    assert err.slug == "validation"
    fields = {e.field for e in err.errors}
    assert {"priority", "max_attempts"} <= fields, err.errors
    assert all(e.message for e in err.errors)
    assert "priority" in str(err)


def test_enqueue_wait_and_result(client: keel.Client) -> None:
    job = client.enqueue("echo", {"hello": "world"}, tags=["sdk"], timeout=5, max_attempts=3)
    assert job.kind == "echo" and job.queue == "default"
    assert job.tags == ["sdk"] and job.max_attempts == 3 and job.timeout_ms == 5000
    assert job.created_at is not None and job.created_at.tzinfo is not None

    done = client.wait(job.id, timeout=DEADLINE)
    assert (done.state, done.attempt, done.result) == ("completed", 1, {"hello": "world"})
    assert done.terminal and done.finished_at is not None
    res = client.result(job.id)
    assert res.ready and res.result == {"hello": "world"}


def test_idempotency_key_returns_the_first_job(client: keel.Client) -> None:
    key = f"py-{uuid.uuid4()}"
    first = client.enqueue("noop", None, idempotency_key=key, delay=3600)
    again = client.enqueue("noop", None, idempotency_key=key, delay=3600)
    assert again.id == first.id


def test_scheduled_job_cancel_and_result(client: keel.Client) -> None:
    run_at = datetime.now(timezone.utc) + timedelta(hours=1)
    job = client.enqueue("echo", {"n": 1}, run_at=run_at)
    assert job.state == "scheduled"
    assert job.run_at is not None and abs((job.run_at - run_at).total_seconds()) < 1

    pending = client.result(job.id)
    assert not pending.ready and pending.state == "scheduled"

    with pytest.raises(keel.WaitTimeout) as timed_out:
        client.wait(job.id, timeout=0.3)
    assert timed_out.value.job is not None and timed_out.value.job.state == "scheduled"

    cancelled = client.cancel(job.id)
    assert cancelled.state == "cancelled"
    with pytest.raises(keel.KeelError) as raised:
        client.result(job.id)
    assert raised.value.status == 409


def test_naive_run_at_is_refused_before_sending(client: keel.Client) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        client.enqueue("noop", run_at=datetime(2030, 1, 1))


def test_enqueue_many_and_list(client: keel.Client) -> None:
    jobs = client.enqueue_many(
        [{"kind": "noop", "queue": QUEUE, "args": {"i": i}, "delay": 3600} for i in range(5)]
    )
    assert [j.args for j in jobs] == [{"i": i} for i in range(5)]
    page = client.list_jobs(queue=QUEUE, limit=3)
    assert len(page.jobs) == 3 and page.next is not None
    rest = client.list_jobs(queue=QUEUE, after=page.next, limit=3)
    assert [j.id for j in page.jobs + rest.jobs] == [j.id for j in jobs]


def test_meta_round_trips_and_is_none_without_it(client: keel.Client) -> None:
    meta = {"trace": "t-1", "n": [1, 2]}
    job = client.enqueue("noop", None, meta=meta, delay=3600)
    assert job.meta == meta
    assert client.get(job.id).meta == meta

    plain = client.enqueue("noop", None, delay=3600)
    assert plain.meta is None and "meta" not in plain.raw
    assert client.get(plain.id).meta is None

    # The batch route takes it per item, like the other options.
    batch = client.enqueue_many(
        [{"kind": "noop", "delay": 3600, "meta": meta}, {"kind": "noop", "delay": 3600}]
    )
    assert [client.get(j.id).meta for j in batch] == [meta, None]


def test_worker_protocol_calls(client: keel.Client) -> None:
    a = client.enqueue("task", {"n": 1}, queue=QUEUE)
    b = client.enqueue("task", {"n": 2}, queue=QUEUE)
    c = client.enqueue("task", {"n": 3}, queue=QUEUE)
    leased = client.lease(QUEUE, "py-raw", max=3, wait=1, lease=30)
    assert sorted(j.id for j in leased) == sorted([a.id, b.id, c.id])
    tokens = {}
    for j in leased:
        assert j.state == "running" and j.attempt == 1
        assert j.lease is not None and j.lease.token and j.lease.owner == "py-raw"
        tokens[j.id] = j.lease.token

    hb = client.heartbeat(a.id, tokens[a.id], lease=60)
    assert not hb.cancel_requested and hb.expires_at is not None

    # One good token and one stale one: judged item by item.
    results = client.complete_many(
        [
            {"id": a.id, "token": tokens[a.id], "result": {"ok": True}},
            {"id": b.id, "token": tokens[c.id], "result": None},
        ]
    )
    assert [r.status for r in results] == [200, 409]
    assert results[0].ok and results[0].state == "completed"
    assert results[1].error is not None and results[1].error.slug == "stale-lease"

    failed = client.fail_many(
        [{"id": b.id, "token": tokens[b.id], "error": "boom", "retry_in": 3600}]
    )
    assert failed[0].ok and failed[0].state == "retryable"
    failed_job = client.get(b.id)
    assert (failed_job.state, failed_job.errors[-1].message) == ("retryable", "boom")

    released = client.release(c.id, tokens[c.id])
    assert (released.state, released.attempt) == ("available", 0)

    with pytest.raises(keel.KeelError) as stale:
        client.complete(a.id, tokens[a.id], "again")
    assert stale.value.status == 409 and stale.value.slug == "stale-lease"


def test_one_queue_equals_its_element_of_queues(client: keel.Client) -> None:
    client.enqueue("task", {"n": 1}, queue=QUEUE)
    client.enqueue("task", {"n": 2}, queue=QUEUE)
    one = client.queue(QUEUE)
    assert (one.queue, one.paused, one.counts["available"]) == (QUEUE, False, 2)
    assert [q for q in client.queues() if q.queue == QUEUE] == [one]

    unused = client.queue("py-never-used")
    assert unused.queue == "py-never-used" and not unused.paused
    assert unused.counts and set(unused.counts.values()) == {0}, unused.counts

    # The name is one escaped path segment, so a "/" in it reaches the server as a bad name.
    with pytest.raises(keel.KeelError) as invalid:
        client.queue("bad name/x")
    assert invalid.value.status == 400 and invalid.value.slug == "malformed-request"

    async def main() -> None:
        async with keel.AsyncClient(client.url) as aclient:
            assert await aclient.queue(QUEUE) == one

    asyncio.run(main())


def test_lease_on_a_queue_the_server_runs_is_refused(client: keel.Client) -> None:
    with pytest.raises(keel.KeelError) as raised:
        client.lease("default", "py-raw")
    assert raised.value.status == 409
    assert raised.value.slug == "queue-served-here"


def test_async_client(server: KeelServer) -> None:
    async def main() -> None:
        async with keel.AsyncClient(server.url) as client:
            job = await client.enqueue("echo", [1, 2, 3])
            done = await client.wait(job.id, timeout=DEADLINE)
            assert (done.state, done.result) == ("completed", [1, 2, 3])
            assert (await client.result(job.id)).result == [1, 2, 3]
            assert (await client.get(job.id)).id == job.id

            with pytest.raises(keel.KeelError) as missing:
                await client.get(str(uuid.uuid4()))
            assert missing.value.status == 404

            with pytest.raises(keel.KeelError) as invalid:
                await client.enqueue("echo", max_attempts=0)
            assert invalid.value.status == 422
            assert [e.field for e in invalid.value.errors] == ["max_attempts"]

            later = await client.enqueue("noop", delay=timedelta(hours=1))
            assert (await client.cancel(later.id)).state == "cancelled"

            many = await client.enqueue_many([{"kind": "noop", "delay": 3600}] * 3)
            assert len({j.id for j in many}) == 3

    asyncio.run(main())
