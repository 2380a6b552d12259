"""Drain N jobs through the Python worker and report jobs per second (not a pytest test).

    python sdks/python/tests/drain_10k.py http://127.0.0.1:8080 [--jobs 10000] [--concurrency 64]
        [--prefetch N]

Against a running `keel serve`, on a fresh queue of its own (``py-drain-<random>``, which
the server must not serve itself, so any name outside its ``KEEL_QUEUES``):

1. enqueues the jobs of kind ``square`` (``{"n": i}``) with ``POST /v1/jobs/batch``, 1000
   per request, and prints the enqueue rate;
2. runs a :class:`keel.Worker` with the given concurrency until ``GET /v1/queues`` counts
   every job completed, and prints the drain rate (from the worker's start to the last
   completion);
3. reads every job back and checks it is ``completed`` with ``attempt == 1`` and the
   handler's result ``{"square": n*n}``. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
import uuid
from typing import Any, Dict, List, Optional

import keel

CHUNK = 1000


def square(ctx: keel.Context, args: Any) -> Any:
    return {"square": args["n"] * args["n"]}


async def square_async(ctx: keel.Context, args: Any) -> Any:
    return {"square": args["n"] * args["n"]}


def enqueue(client: keel.Client, queue: str, n: int) -> List[str]:
    ids: List[str] = []
    for start in range(0, n, CHUNK):
        specs: List[keel.JobSpec] = [
            {"kind": "square", "args": {"n": i}, "queue": queue}
            for i in range(start, min(n, start + CHUNK))
        ]
        ids.extend(job.id for job in client.enqueue_many(specs))
    return ids


def counts(client: keel.Client, queue: str) -> Dict[str, int]:
    for q in client.queues():
        if q.queue == queue:
            return q.counts
    return {}


def verify(client: keel.Client, queue: str, n: int) -> List[str]:
    """Every problem found; empty when all N jobs completed once with the right result."""
    problems: List[str] = []
    seen = 0
    after: Optional[str] = None
    while True:
        page = client.list_jobs(queue=queue, after=after, limit=1000)
        for job in page.jobs:
            seen += 1
            i = job.args["n"]
            want = {"square": i * i}
            if (job.state, job.attempt, job.result) != ("completed", 1, want):
                problems.append(
                    f"job {job.id} (n={i}): state {job.state}, attempt {job.attempt}, "
                    f"result {job.result!r}; want completed, 1, {want!r}"
                )
        if page.next is None:
            break
        after = page.next
    if seen != n:
        problems.append(f"the queue holds {seen} jobs, not {n}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("url", help="the Keel API, e.g. http://127.0.0.1:8080")
    parser.add_argument("--jobs", type=int, default=10_000, help="how many jobs (10000)")
    parser.add_argument("--concurrency", type=int, default=64, help="worker slots (64)")
    parser.add_argument("--queue", help="queue name (default: py-drain-<random>)")
    parser.add_argument(
        "--async", dest="use_async", action="store_true", help="use an async def handler"
    )
    parser.add_argument("--batch-window", type=float, default=0.005, help="seconds (0.005)")
    parser.add_argument(
        "--prefetch",
        type=int,
        default=keel.Worker.DEFAULT_PREFETCH,
        help=f"the worker's prefetch cap ({keel.Worker.DEFAULT_PREFETCH}; 0: lease for free "
        "slots only)",
    )
    parser.add_argument("--api-key", help="API key, when the server has keys configured")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after (600 s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="the SDK's INFO logs")
    opts = parser.parse_args()

    logging.basicConfig(
        level=logging.INFO if opts.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    queue = opts.queue or f"py-drain-{uuid.uuid4().hex[:8]}"
    n = opts.jobs

    with keel.Client(opts.url, api_key=opts.api_key, timeout=60) as client:
        t0 = time.perf_counter()
        enqueue(client, queue, n)
        took = time.perf_counter() - t0
        print(f"enqueued {n} jobs on queue {queue} in {took:.2f} s ({n / took:.0f} jobs/s)")

        worker = keel.Worker(
            client,
            queues=[queue],
            concurrency=opts.concurrency,
            batch_window=opts.batch_window,
            prefetch=opts.prefetch,
            worker_id=f"drain-{uuid.uuid4().hex[:8]}",
        )
        worker.register("square", square_async if opts.use_async else square)
        failure: List[BaseException] = []

        def run() -> None:
            try:
                worker.run()
            except BaseException as e:  # reported below
                failure.append(e)

        thread = threading.Thread(target=run, name="drain-worker", daemon=True)
        t0 = time.perf_counter()
        thread.start()
        deadline = t0 + opts.timeout
        done: Dict[str, int] = {}
        while True:
            done = counts(client, queue)
            if done.get("completed", 0) + done.get("discarded", 0) >= n or failure:
                break
            if time.perf_counter() > deadline:
                print(f"gave up after {opts.timeout:g} s: {done}", file=sys.stderr)
                break
            time.sleep(0.1)
        took = time.perf_counter() - t0
        worker.stop()
        thread.join(120)
        if failure:
            print(f"the worker failed: {failure[0]!r}", file=sys.stderr)
            return 1
        style = "async" if opts.use_async else "sync"
        print(
            f"drained {done.get('completed', 0)} jobs in {took:.2f} s: {n / took:.0f} jobs/s "
            f"(concurrency {opts.concurrency}, prefetch {opts.prefetch}, {style} handler, "
            f"batch window {opts.batch_window * 1000:g} ms)"
        )

        problems = verify(client, queue, n)
        if problems:
            for line in problems[:20]:
                print(line, file=sys.stderr)
            print(f"{len(problems)} problem(s) in {n} jobs", file=sys.stderr)
            return 1
        print(f"checked {n} jobs: all completed, attempt 1, result as the handler returned")
        return 0


if __name__ == "__main__":
    sys.exit(main())
