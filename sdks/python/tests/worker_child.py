"""A worker process for the SIGTERM tests (run by test_scenarios.py, not by pytest).

    python worker_child.py URL --queue Q --concurrency N --grace S [--lease S] --marks DIR

Handlers: ``one_second`` sleeps 1 s and returns ``{"slept": 1}``; ``until_cancelled`` waits
for its cancellation; ``square`` returns ``{"square": n*n}``. Each handler creates
``DIR/<job id>`` (holding the job's lease token) when it starts, so the test knows when
every job is running before it sends a signal, and can replay a dead worker's token. ``worker.run()`` runs on the main thread, so it installs its own SIGTERM and
SIGINT handlers; the process exits with run()'s outcome (0 when it returns).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import keel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--grace", type=float, default=3.0)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--marks", type=Path, required=True)
    opts = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    worker = keel.Worker(
        opts.url,
        queues=[opts.queue],
        concurrency=opts.concurrency,
        grace=opts.grace,
        lease=opts.lease,
    )

    def mark(ctx: keel.Context) -> None:
        # The file holds the lease token, so a test can replay it after killing us.
        lease = ctx.job.lease
        (opts.marks / ctx.id).write_text((lease.token or "") if lease else "")

    @worker.handler("one_second")
    def one_second(ctx: keel.Context, args: Any) -> Any:
        mark(ctx)
        time.sleep(1)
        return {"slept": 1}

    @worker.handler("until_cancelled")
    def until_cancelled(ctx: keel.Context, args: Any) -> Any:
        mark(ctx)
        ctx.cancel_event.wait()
        return {"cancelled": True}

    @worker.handler("square")
    def square(ctx: keel.Context, args: Any) -> Any:
        mark(ctx)
        return {"square": args["n"] * args["n"]}

    worker.run()


if __name__ == "__main__":
    main()
