"""A worker process that dies or is stopped with many jobs in hand (issue 13's acceptance).

- SIGKILL a worker holding 50 jobs: another worker completes them once their leases lapse,
  the dead worker's tokens are refused with 409, and each job's result is the second
  worker's.
- SIGTERM a worker with 20 running jobs: those that can finish within the grace period
  finish, the rest are released with their attempt not counted, and the process exits 0.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import httpx
from keel_server import KeelServer
from support import DEADLINE, WorkerThread, wait_until

import keel

HERE = Path(__file__).resolve().parent
QUEUE = "py-processes"


def start_child(server: KeelServer, marks: Path, *args: str) -> "subprocess.Popen[str]":
    return subprocess.Popen(
        [sys.executable, str(HERE / "worker_child.py"), server.url, "--queue", QUEUE,
         "--marks", str(marks), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_killed_worker_holding_50_jobs_loses_them_to_another(
    server: KeelServer, client: keel.Client, tmp_path: Path
) -> None:
    jobs = [client.enqueue("until_cancelled", {"i": i}, queue=QUEUE) for i in range(50)]
    marks = tmp_path / "started"
    marks.mkdir()
    child = start_child(server, marks, "--concurrency", "50", "--lease", "5")
    try:
        wait_until(
            lambda: len(list(marks.iterdir())) == 50 or child.poll() is not None,
            "the worker process to hold all 50 jobs",
        )
        assert child.poll() is None, f"the worker exited early:\n{child.communicate()[0]}"
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=DEADLINE)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    dead_tokens: Dict[str, str] = {m.name: m.read_text() for m in marks.iterdir()}
    assert sorted(dead_tokens) == sorted(j.id for j in jobs)
    assert all(dead_tokens.values()), "every started job recorded its token"

    # A second worker takes them once the dead worker's leases lapse and are rescued.
    second = keel.Worker(server.url, queues=[QUEUE], concurrency=50, poll_wait=1.0)

    @second.handler("until_cancelled")
    def finish(ctx: keel.Context, args: Any) -> Any:
        return {"by": "second", "i": args["i"]}

    thread = WorkerThread(second).start()
    try:
        wait_until(
            lambda: all(client.get(j.id).state == "completed" for j in jobs),
            "the second worker to complete all 50 rescued jobs",
            timeout=120,
        )
    finally:
        thread.stop()

    refused: List[int] = []
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for job_id, token in dead_tokens.items():
            r = http.post(f"/v1/jobs/{job_id}/complete", json={"token": token, "result": "dead"})
            refused.append(r.status_code)
            assert r.json()["type"].endswith("/stale-lease"), r.text
    assert refused == [409] * 50
    for j in jobs:
        got = client.get(j.id)
        # The first attempt was the dead worker's, rescued when its lease lapsed.
        assert (got.state, got.attempt, got.result) == (
            "completed", 2, {"by": "second", "i": j.args["i"]}
        ), got


def test_sigterm_with_20_running_jobs_finishes_or_releases_them(
    server: KeelServer, client: keel.Client, tmp_path: Path
) -> None:
    quick = [client.enqueue("one_second", {"i": i}, queue=QUEUE) for i in range(10)]
    stuck = [client.enqueue("until_cancelled", {"i": i}, queue=QUEUE) for i in range(10)]
    marks = tmp_path / "started"
    marks.mkdir()
    child = start_child(server, marks, "--concurrency", "20", "--grace", "3")
    try:
        wait_until(
            lambda: len(list(marks.iterdir())) == 20 or child.poll() is not None,
            "all 20 handlers to start in the worker process",
        )
        assert child.poll() is None, f"the worker exited early:\n{child.communicate()[0]}"
        child.send_signal(signal.SIGTERM)
        output, _ = child.communicate(timeout=DEADLINE)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, f"the worker exited {child.returncode}:\n{output}"
    for j in quick:
        got = client.get(j.id)
        assert (got.state, got.attempt, got.result) == ("completed", 1, {"slept": 1}), got
    for j in stuck:
        got = client.get(j.id)
        assert (got.state, got.attempt) == ("available", 0), got
