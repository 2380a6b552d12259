"""Helpers shared by the tests: waiting for a condition, and a worker on a thread.

Tests wait for outcomes by polling with a generous deadline, never by sleeping a guessed
amount: a slow CI machine makes them slower, not flaky.
"""

from __future__ import annotations

import importlib
import threading
import time
from typing import Callable, Iterable, List, Optional, TypeVar

import pytest
from keel_server import services_required

import keel

T = TypeVar("T")

DEADLINE = 60.0


def wait_until(
    check: Callable[[], Optional[T]], what: str, timeout: float = DEADLINE, interval: float = 0.05
) -> T:
    """Calls ``check`` until it returns something truthy, and returns that."""
    deadline = time.monotonic() + timeout
    last: Optional[T] = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what} (last: {last!r})"
            )
        time.sleep(interval)


def require_module(name: str, install: str) -> None:
    """Skips the calling test when the optional module ``name`` is not installed, or fails
    it under ``KEEL_REQUIRE_SERVICES=1``: CI installs every extra, so there a missing module
    is a broken setup rather than a choice."""
    try:
        importlib.import_module(name)
    except ImportError as e:
        if services_required():
            pytest.fail(
                f"KEEL_REQUIRE_SERVICES=1 but {name} is not installed ({e}): pip install {install}",
                pytrace=False,
            )
        pytest.skip(f"{name} is not installed: pip install {install}")


def jobs_in(client: keel.Client, queue: str) -> List[keel.Job]:
    """Every job of ``queue``, through the paginated list."""
    out: List[keel.Job] = []
    after: Optional[str] = None
    while True:
        page = client.list_jobs(queue=queue, after=after, limit=1000)
        out.extend(page.jobs)
        if page.next is None:
            return out
        after = page.next


def states(client: keel.Client, ids: Iterable[str]) -> List[str]:
    return [client.get(i).state for i in ids]


class WorkerThread:
    """Runs ``worker.run()`` on a thread (so no signal handlers), for in-process tests."""

    def __init__(self, worker: keel.Worker) -> None:
        self.worker = worker
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._main, name="keel-test-worker", daemon=True)

    def _main(self) -> None:
        try:
            self.worker.run()
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def start(self) -> "WorkerThread":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = DEADLINE) -> None:
        """``worker.stop()``, then asserts ``run()`` returned, without an error."""
        self.worker.stop()
        self.join(timeout)

    def join(self, timeout: float = DEADLINE) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"worker.run() did not return within {timeout:g}s"
        if self.error is not None:
            raise AssertionError(f"worker.run() raised {self.error!r}") from self.error

    def __enter__(self) -> "WorkerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self.stop()
