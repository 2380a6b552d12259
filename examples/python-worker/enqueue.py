"""Enqueue a few `fetch_size` jobs and print their results.

    python examples/python-worker/enqueue.py            # serves this directory on 127.0.0.1
    python examples/python-worker/enqueue.py URL ...    # or fetch the URLs you name

Without URLs, it starts a local file server on 127.0.0.1 (what ``python -m http.server``
does) over this example's directory, so no outside network is needed, and asks for three
files that exist and one that does not (a 404 is an answer too). Then it waits for each job
and prints its result. Run `worker.py` beside it, or the jobs just wait in the queue.
"""

from __future__ import annotations

import functools
import http.server
import os
import sys
import threading
from pathlib import Path
from typing import List

import keel

QUEUE = "fetch"
HERE = Path(__file__).resolve().parent


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def serve_here() -> http.server.ThreadingHTTPServer:
    """A file server over this directory on an ephemeral port of 127.0.0.1."""
    handler = functools.partial(QuietHandler, directory=str(HERE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> int:
    urls: List[str] = sys.argv[1:]
    files = None
    if not urls:
        files = serve_here()
        base = f"http://127.0.0.1:{files.server_address[1]}"
        urls = [f"{base}/README.md", f"{base}/worker.py", f"{base}/enqueue.py", f"{base}/nope"]

    with keel.Client(os.environ.get("KEEL_URL", "http://127.0.0.1:8080")) as client:
        jobs = [
            client.enqueue("fetch_size", {"url": url}, queue=QUEUE, max_attempts=3) for url in urls
        ]
        print(f"enqueued {len(jobs)} jobs on queue {QUEUE!r}; waiting for a worker to run them")
        failed = 0
        for job in jobs:
            try:
                done = client.wait(job.id, timeout=60)
            except keel.WaitTimeout as e:
                state = e.job.state if e.job else "unknown"
                print(f"{job.id}: still {state} after 60 s (is worker.py running?)")
                failed += 1
                continue
            if done.state == "completed":
                print(f"{job.id}: {done.result}")
            else:
                last = done.errors[-1].message if done.errors else "no error recorded"
                print(f"{job.id}: {done.state}: {last}")
                failed += 1

    if files is not None:
        files.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
