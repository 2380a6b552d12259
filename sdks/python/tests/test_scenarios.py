"""The SDK scenarios of sdks/SCENARIOS.md, each against a real `keel serve`.

Every test is parametrised over the backends (``server`` fixture): SQLite always, Postgres
when ``KEEL_TEST_DATABASE_URL`` is set. Test names contain ``scenario_<name>`` so
``grep -r scenario_<name> sdks crates`` finds every SDK's implementation.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import httpx
import pytest
from keel_server import KeelServer
from support import DEADLINE, WorkerThread, jobs_in, wait_until

import keel

#: A queue no built-in worker serves (the servers run with KEEL_QUEUES=default:4).
QUEUE = "py-work"
HERE = Path(__file__).resolve().parent

STYLES = ["sync", "async"]

#: The long poll of the test workers. A stopping worker waits for the poll in flight (see
#: keel/_runtime.py), so a shorter one than the default 10 s keeps each test's stop short.
POLL_WAIT = 2.0


def new_worker(server: KeelServer, **settings: Any) -> keel.Worker:
    settings.setdefault("poll_wait", POLL_WAIT)
    return keel.Worker(server.url, queues=[QUEUE], **settings)


def square_handler(style: str) -> keel.Handler:
    if style == "async":

        async def square_async(ctx: keel.Context, args: Any) -> Any:
            await asyncio.sleep(0)
            return {"square": args["n"] * args["n"]}

        return square_async

    def square(ctx: keel.Context, args: Any) -> Any:
        return {"square": args["n"] * args["n"]}

    return square


# ---------------------------------------------------------------------------------------
# drain


@pytest.mark.parametrize("style", STYLES)
def test_scenario_drain(server: KeelServer, client: keel.Client, style: str) -> None:
    jobs = client.enqueue_many(
        [{"kind": "square", "args": {"n": i}, "queue": QUEUE} for i in range(200)]
    )
    worker = new_worker(server, concurrency=8, worker_id=f"py-drain-{style}")
    worker.register("square", square_handler(style))

    with WorkerThread(worker):
        listed = wait_until(
            lambda: [w for w in client.workers() if w.id == worker.worker_id],
            "the worker to be listed in GET /v1/workers",
        )
        assert QUEUE in listed[0].queues
        wait_until(
            lambda: sum(j.state == "completed" for j in jobs_in(client, QUEUE)) == 200,
            "all 200 jobs to complete",
        )

    by_id = {j.id: j for j in jobs_in(client, QUEUE)}
    for i, enqueued in enumerate(jobs):
        job = by_id[enqueued.id]
        assert (job.state, job.attempt, job.result) == ("completed", 1, {"square": i * i}), job


# ---------------------------------------------------------------------------------------
# cancel


@pytest.mark.parametrize("style", STYLES)
def test_scenario_cancel(server: KeelServer, client: keel.Client, style: str) -> None:
    lease = 5.0
    started = threading.Event()
    heard: Dict[str, Any] = {}
    worker = new_worker(server, concurrency=2, lease=lease)
    worker.register("square", square_handler(style))

    if style == "async":

        @worker.handler("until_cancelled")
        async def until_cancelled_async(ctx: keel.Context, args: Any) -> Any:
            started.set()
            await asyncio.wait_for(ctx.wait_cancelled(), DEADLINE)
            heard.update(at=time.monotonic(), reason=ctx.cancel_reason)
            return {"cancelled": ctx.cancelled}

    else:

        @worker.handler("until_cancelled")
        def until_cancelled(ctx: keel.Context, args: Any) -> Any:
            started.set()
            if ctx.cancel_event.wait(DEADLINE):
                heard.update(at=time.monotonic(), reason=ctx.cancel_reason)
            return {"cancelled": ctx.cancelled}

    with WorkerThread(worker):
        job = client.enqueue("until_cancelled", {}, queue=QUEUE)
        wait_until(started.is_set, "the handler to start")
        assert client.get(job.id).state == "running"
        sent = time.monotonic()
        client.cancel(job.id)
        wait_until(lambda: "at" in heard, "the handler to hear of its cancellation")
        # The reason says which path brought the news: a heartbeat's cancel_requested, not a
        # lost lease or a stop. How long it took is printed, not asserted (SCENARIOS.md).
        assert heard["reason"] == "cancelled"
        print(f"cancel heard after {heard['at'] - sent:.3f} s; heartbeat every {lease / 3:.3f} s")
        assert client.get(job.id).state == "cancelled"

        later = client.enqueue("square", {"n": 7}, queue=QUEUE)
        done = client.wait(later.id, timeout=DEADLINE)
        assert (done.state, done.result) == ("completed", {"square": 49})

    assert client.get(job.id).state == "cancelled"


# ---------------------------------------------------------------------------------------
# lease_loss


def test_scenario_lease_loss(server: KeelServer, client: keel.Client) -> None:
    job = client.enqueue("square", {"n": 12}, queue=QUEUE)
    # A worker that leases over raw HTTP and then goes silent.
    raw = httpx.post(
        f"{server.url}/v1/queues/{QUEUE}/lease",
        json={"worker": "raw-http-worker", "max": 1, "lease": "5s"},
        timeout=30,
    )
    assert raw.status_code == 200, raw.text
    leased = raw.json()["jobs"]
    assert [j["id"] for j in leased] == [job.id]
    assert leased[0]["attempt"] == 1
    first_token = leased[0]["lease"]["token"]

    worker = new_worker(server, concurrency=2, lease=5)
    worker.register("square", square_handler("sync"))
    with WorkerThread(worker):
        # The lease lapses, maintenance rescues the job, and the SDK worker takes it.
        done = client.wait(job.id, timeout=DEADLINE)

    assert (done.state, done.attempt, done.result) == ("completed", 2, {"square": 144}), done

    replay = httpx.post(
        f"{server.url}/v1/jobs/{job.id}/complete",
        json={"token": first_token, "result": "from the presumed-dead worker"},
        timeout=30,
    )
    assert replay.status_code == 409, replay.text
    assert replay.json()["type"].endswith("stale-lease")
    after = client.get(job.id)
    assert (after.state, after.attempt, after.result) == ("completed", 2, {"square": 144})


# ---------------------------------------------------------------------------------------
# shutdown


def _enqueue_shutdown_jobs(client: keel.Client) -> Tuple[List[keel.Job], List[keel.Job]]:
    quick = [client.enqueue("one_second", {"i": i}, queue=QUEUE) for i in range(4)]
    stuck = [client.enqueue("until_cancelled", {"i": i}, queue=QUEUE) for i in range(4)]
    return quick, stuck


def _assert_shutdown_outcome(
    client: keel.Client, quick: List[keel.Job], stuck: List[keel.Job]
) -> None:
    for j in quick:
        got = client.get(j.id)
        assert (got.state, got.attempt, got.result) == ("completed", 1, {"slept": 1}), got
    for j in stuck:
        got = client.get(j.id)
        # Released, not failed: available again and the attempt not counted.
        assert (got.state, got.attempt) == ("available", 0), got


def test_scenario_shutdown(server: KeelServer, client: keel.Client) -> None:
    quick, stuck = _enqueue_shutdown_jobs(client)
    lock = threading.Lock()
    started: List[str] = []
    reasons: List[Any] = []
    worker = new_worker(server, concurrency=8, grace=3)

    @worker.handler("one_second")
    def one_second(ctx: keel.Context, args: Any) -> Any:
        with lock:
            started.append(ctx.id)
        time.sleep(1)
        return {"slept": 1}

    @worker.handler("until_cancelled")
    def until_cancelled(ctx: keel.Context, args: Any) -> Any:
        with lock:
            started.append(ctx.id)
        ctx.cancel_event.wait(DEADLINE)
        with lock:
            reasons.append(ctx.cancel_reason)
        return {"cancelled": ctx.cancelled}

    runner = WorkerThread(worker).start()
    wait_until(lambda: len(started) == 8, "all 8 handlers to start")
    runner.stop()  # asserts run() returned

    _assert_shutdown_outcome(client, quick, stuck)
    wait_until(lambda: len(reasons) == 4, "the stuck handlers to be told to stop")
    assert reasons == ["shutdown"] * 4


def test_scenario_shutdown_sigterm(server: KeelServer, client: keel.Client, tmp_path: Path) -> None:
    quick, stuck = _enqueue_shutdown_jobs(client)
    marks = tmp_path / "started"
    marks.mkdir()
    child = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "worker_child.py"),
            server.url,
            "--queue",
            QUEUE,
            "--concurrency",
            "8",
            "--grace",
            "3",
            "--marks",
            str(marks),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(
            lambda: len(list(marks.iterdir())) == 8 or child.poll() is not None,
            "all 8 handlers to start in the worker process",
        )
        assert child.poll() is None, f"the worker process exited early:\n{child.communicate()[0]}"
        child.send_signal(signal.SIGTERM)
        output, _ = child.communicate(timeout=DEADLINE)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, f"the worker process exited {child.returncode}:\n{output}"
    _assert_shutdown_outcome(client, quick, stuck)


# ---------------------------------------------------------------------------------------
# bad_input


def test_scenario_bad_input(server: KeelServer, client: keel.Client) -> None:
    # A fixed one-hour backoff keeps a failed job `retryable` while the test looks at it.
    later = {"type": "fixed", "delay_ms": 3_600_000}
    raising = client.enqueue("raises", {}, queue=QUEUE, backoff=later)
    permanent = client.enqueue("permanent", {}, queue=QUEUE, backoff=later)
    not_json = client.enqueue("not_json", {}, queue=QUEUE, backoff=later)

    worker = new_worker(server, concurrency=4)
    worker.register("square", square_handler("sync"))

    @worker.handler("raises")
    def raises(ctx: keel.Context, args: Any) -> Any:
        raise ValueError("the input is bad")

    @worker.handler("permanent")
    def permanent_failure(ctx: keel.Context, args: Any) -> Any:
        raise keel.PermanentError("this can never work")

    @worker.handler("not_json")
    def returns_a_set(ctx: keel.Context, args: Any) -> Any:
        return {"ids": {1, 2, 3}}

    with WorkerThread(worker):
        ids = [raising.id, permanent.id, not_json.id]
        wait_until(
            lambda: all(client.get(i).state in ("retryable", "discarded") for i in ids),
            "the three jobs to fail their attempt",
        )
        # The worker goes on.
        ok = client.wait(client.enqueue("square", {"n": 3}, queue=QUEUE).id, timeout=DEADLINE)
        assert (ok.state, ok.result) == ("completed", {"square": 9})

    r = client.get(raising.id)
    assert (r.state, r.attempt) == ("retryable", 1), r
    assert [e.message for e in r.errors] == ["ValueError: the input is bad"]

    p = client.get(permanent.id)
    assert (p.state, p.attempt) == ("discarded", 1), p
    assert "this can never work" in p.errors[-1].message

    n = client.get(not_json.id)
    assert (n.state, n.attempt) == ("retryable", 1), n
    assert "not JSON-serialisable" in n.errors[-1].message
    assert "set" in n.errors[-1].message

    with pytest.raises(keel.KeelError) as raised:
        client.enqueue("square", {"n": 1}, queue="not a queue name", priority=42, max_attempts=0)
    err = raised.value
    assert err.status == 422
    assert err.slug == "validation"
    assert {"queue", "priority", "max_attempts"} <= {f.field for f in err.errors}, err.errors
