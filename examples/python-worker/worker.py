"""A Keel worker in Python: runs `fetch_size` jobs from the `fetch` queue.

    python examples/python-worker/worker.py          # KEEL_URL defaults to http://127.0.0.1:8080

A `fetch_size` job's args are ``{"url": "http://…"}``; its result is
``{"url": …, "bytes": <size of the body>, "status": <HTTP status>}``. The worker runs until
Ctrl-C or SIGTERM, then lets running jobs finish (up to 30 s) and gives the rest back to
Keel unrun.

The `fetch` queue is not in Keel's ``KEEL_QUEUES`` (``default:8`` unless you changed it),
so Keel leaves its jobs to external workers like this one.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from typing import Any, Dict

import keel

QUEUE = "fetch"
CHUNK = 64 * 1024

worker = keel.Worker(
    os.environ.get("KEEL_URL", "http://127.0.0.1:8080"),
    queues=[QUEUE],
    concurrency=8,
)


@worker.handler("fetch_size")
def fetch_size(ctx: keel.Context, args: Dict[str, Any]) -> Dict[str, Any]:
    url = args.get("url") if isinstance(args, dict) else None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        # Retrying cannot fix bad input: discard the job at once.
        raise keel.PermanentError(f"args.url must be an http(s) URL, got {url!r}")

    ctx.logger.info("fetching %s", url)
    try:
        response = urllib.request.urlopen(url, timeout=10)
    except urllib.error.HTTPError as e:
        if e.code >= 500:
            # The server may recover: fail this attempt, and Keel retries with backoff.
            raise RuntimeError(f"{url} answered {e.code}") from e
        response = e  # a 4xx is an answer too: measure its body
    with response:
        size = 0
        while chunk := response.read(CHUNK):
            size += len(chunk)
            if ctx.cancelled:
                # Someone cancelled the job (POST /v1/jobs/{id}/cancel): stop early.
                # What the handler returns now is not recorded.
                ctx.logger.info("cancelled after %d bytes", size)
                return {"url": url, "bytes": size, "status": response.status}
        return {"url": url, "bytes": size, "status": response.status}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    worker.run()
