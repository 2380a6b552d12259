"""Prefetch: the jobs a worker leases ahead of its slots, against a real `keel serve`.

A buffered job is a leased job (state ``running`` on the server) whose handler has not
started. These tests make one deterministic by holding every slot with a handler that
waits on a gate, and then check what the server records:

- ``prefetch_stop``: stopping releases the buffered jobs at once (``available``,
  ``attempt`` 0), before the running ones finish, and a second worker then runs every job
  exactly once;
- a buffered job's lease is renewed by heartbeats while it waits, so it is never rescued;
- a buffered job cancelled while it waits is dropped without running.
"""

from __future__ import annotations

import threading
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List, Optional, Set

from keel_server import KeelServer
from support import DEADLINE, WorkerThread, jobs_in, wait_until

import keel

#: A queue no built-in worker serves (the servers run with KEEL_QUEUES=default:4).
QUEUE = "py-prefetch"
#: The long poll of the test workers, short so that a stop does not wait long for one.
POLL_WAIT = 2.0


class Gated:
    """A handler that counts its runs per job id and waits until the gate opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self._lock = threading.Lock()
        self._runs: Counter[str] = Counter()

    def __call__(self, ctx: keel.Context, args: Any) -> Any:
        with self._lock:
            self._runs[ctx.id] += 1
        if not self.gate.wait(DEADLINE):
            raise TimeoutError("the test never opened the gate")
        return {"i": args["i"]}

    @property
    def runs(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._runs)


def new_worker(server: KeelServer, gated: Gated, **settings: Any) -> keel.Worker:
    settings.setdefault("poll_wait", POLL_WAIT)
    worker = keel.Worker(server.url, queues=[QUEUE], **settings)
    worker.register("gated", gated)
    return worker


def enqueue(client: keel.Client, n: int) -> List[keel.Job]:
    return client.enqueue_many(
        [{"kind": "gated", "args": {"i": i}, "queue": QUEUE} for i in range(n)]
    )


def leased(client: keel.Client) -> Set[str]:
    """The ids of the queue's jobs in state ``running``: started or buffered."""
    return {j.id for j in client.list_jobs(queue=QUEUE, state="running", limit=1000).jobs}


def wait_for_buffer(client: keel.Client, gated: Gated, slots: int) -> Set[str]:
    """Waits until every slot runs a gated handler and more jobs are leased than there are
    slots; returns the leased ids."""

    def check() -> Optional[Set[str]]:
        if len(gated.runs) != slots:
            return None
        ids = leased(client)
        return ids if len(ids) > slots else None

    return wait_until(check, f"{slots} slot(s) busy and at least one job buffered")


def test_scenario_prefetch_stop(server: KeelServer, client: keel.Client) -> None:
    slots = 2
    jobs = enqueue(client, 8)
    gated = Gated()
    worker = new_worker(server, gated, concurrency=slots, grace=DEADLINE)
    assert worker.prefetch == keel.Worker.DEFAULT_PREFETCH
    runner = WorkerThread(worker).start()
    try:
        # Every slot is held by a gated handler, and the worker leased more than its slots.
        held = wait_for_buffer(client, gated, slots)
        started = set(gated.runs)
        buffered = held - started
        assert started <= held and buffered, (started, held)
        for i in buffered:
            job = client.get(i)
            assert job.lease is not None and job.lease.owner == worker.worker_id, job

        worker.stop()
        # The buffered jobs are given back at once, while the running handlers still wait.
        wait_until(
            lambda: all(client.get(i).state == "available" for i in buffered),
            "the buffered jobs to be released",
        )
        assert set(gated.runs) == started, "a buffered job started after stop()"
        for i in started:
            assert client.get(i).state == "running"
        gated.gate.set()
        runner.join()
    finally:
        gated.gate.set()
        if runner.alive:
            runner.stop()

    for j in jobs:
        got = client.get(j.id)
        if j.id in started:
            # Finished within the grace period, as the stop semantics say.
            assert (got.state, got.attempt, got.result) == ("completed", 1, j.args), got
        else:
            # Released (buffered) or never leased: available, the attempt not counted.
            assert (got.state, got.attempt) == ("available", 0), got

    # A new worker runs the rest; nothing was lost, and nothing runs twice.
    with WorkerThread(new_worker(server, gated, concurrency=slots)):
        wait_until(
            lambda: all(j.state == "completed" for j in jobs_in(client, QUEUE)),
            "every job to complete",
        )
    assert gated.runs == {j.id: 1 for j in jobs}
    for j in jobs_in(client, QUEUE):
        assert (j.state, j.attempt, j.result) == ("completed", 1, j.args), j


def test_buffered_job_lease_is_renewed_by_heartbeats(
    server: KeelServer, client: keel.Client
) -> None:
    # One slot and a buffer of exactly one: the first lease takes both jobs; one runs
    # (gated), the other waits in the buffer far longer than its 5 s lease.
    enqueue(client, 2)
    gated = Gated()
    worker = new_worker(server, gated, concurrency=1, prefetch=1, lease=5, heartbeat_interval=0.5)
    with WorkerThread(worker):
        held = wait_for_buffer(client, gated, 1)
        assert len(held) == 2, held  # one running, and a buffer of exactly one
        (waiting,) = held - set(gated.runs)
        first = client.get(waiting)
        assert first.lease is not None and first.lease.expires_at is not None, first
        expiry = first.lease.expires_at

        def renewed() -> bool:
            lease = client.get(waiting).lease
            return lease is not None and lease.expires_at is not None and lease.expires_at > expiry

        wait_until(renewed, "a heartbeat to renew the buffered job's lease")
        # Past the first lease's end (maintenance runs every 200 ms), the job is still
        # leased to this worker, on its first attempt: it was not rescued.
        wait_until(
            lambda: datetime.now(timezone.utc) > expiry + timedelta(seconds=1),
            "the buffered job's first lease to have run out",
        )
        now = client.get(waiting)
        assert (now.state, now.attempt) == ("running", 1), now
        assert now.lease is not None and now.lease.owner == worker.worker_id, now
        assert waiting not in gated.runs

        gated.gate.set()
        wait_until(
            lambda: all(j.state == "completed" for j in jobs_in(client, QUEUE)),
            "both jobs to complete",
        )
    done = client.get(waiting)
    assert (done.state, done.attempt) == ("completed", 1), done
    assert set(gated.runs.values()) == {1}


def test_cancelled_buffered_job_is_dropped_unrun(server: KeelServer, client: keel.Client) -> None:
    enqueue(client, 2)
    gated = Gated()
    worker = new_worker(server, gated, concurrency=1, prefetch=1, lease=5, heartbeat_interval=0.5)
    with WorkerThread(worker):
        held = wait_for_buffer(client, gated, 1)
        assert len(held) == 2, held  # one running, and a buffer of exactly one
        (running,) = gated.runs
        (waiting,) = held - {running}
        # The worker's capacity (1 slot + 1 buffered) is full, so this one stays available…
        later = client.enqueue("gated", {"i": 2}, queue=QUEUE)
        client.cancel(waiting)
        # …until a heartbeat hears of the cancel and the worker drops the buffered job,
        # which frees its place: the later job is leased while the slot is still held.
        wait_until(lambda: client.get(later.id).state == "running", "the later job's lease")
        assert client.get(waiting).state == "cancelled"
        assert gated.runs == {running: 1}

        gated.gate.set()
        wait_until(lambda: client.get(later.id).state == "completed", "the later job to complete")
    assert gated.runs == {running: 1, later.id: 1}
    assert client.get(running).state == "completed"
    assert client.get(waiting).state == "cancelled"
