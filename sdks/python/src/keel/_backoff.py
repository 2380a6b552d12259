"""Delays between repeated tries: polling a job, and retrying after a network error."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator


def poll_delays(first: float = 0.05, factor: float = 1.5, cap: float = 1.0) -> Iterator[float]:
    """Delays for polling a job until it finishes: quick at first, since most jobs are
    short, then capped so a long job costs one cheap request per ``cap`` seconds."""
    delay = first
    while True:
        yield delay
        delay = min(cap, delay * factor)


@dataclass
class Backoff:
    """Capped exponential backoff with jitter, for retrying after a failure.

    Each delay is drawn from the upper half of its window ("equal jitter"), so workers that
    lost the server at the same moment do not come back at the same moment, and no delay is
    ever near zero, which would turn an outage into a busy loop. :meth:`reset` after a
    success.
    """

    base: float = 0.2
    cap: float = 10.0
    failures: int = 0
    #: A source of uniform numbers in [0, 1); the module's shared generator by default, as
    #: seeding one per instance would cost more than the jitter is worth.
    uniform: Callable[[], float] = random.random

    def next(self) -> float:
        """The delay before the next try; each call counts one more failure."""
        window = min(self.cap, self.base * (2.0 ** min(self.failures, 30)))
        self.failures += 1
        return window / 2 + self.uniform() * window / 2

    def reset(self) -> None:
        self.failures = 0
