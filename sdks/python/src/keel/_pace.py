"""How far ahead a worker leases: enough jobs to keep its slots busy through the next lease
round trip, and no more.

A fixed buffer is wrong one way or the other: short jobs drain a small one long before the
next lease answers (slots idle, waiting for the server), and long jobs sit in a large one
for minutes while other workers have free slots. So the buffer follows what the slots
consume, as Keel's built-in dispatchers do (crates/keel-runtime/src/dispatcher.rs): jobs
started per second × the lease round trip × :attr:`Pace.MARGIN`, between one job and the
worker's ``prefetch`` cap. Millisecond jobs on 20 slots buffer dozens; ten-second jobs
buffer one.

The rate is measured over windows of :attr:`Pace.WINDOW`, so after an idle spell it lags a
burst by several windows, and the slots starve meanwhile. So while leases come back full to
slots that have run out of work (nothing buffered, a slot free), a floor under the prefetch
doubles at each lease (as TCP's slow start doubles its window), reaching the cap in a few
round trips; once the slots have work when a lease answers, or a lease brings fewer jobs
than asked, it halves. See :meth:`Pace.answered`.
"""

from __future__ import annotations

import math
from typing import Callable

#: The ``prefetch`` cap a worker gets unless it says otherwise, as for Keel's built-in
#: workers.
DEFAULT_PREFETCH = 256
#: The largest ``prefetch`` cap accepted (the server's own bound for its built-in workers):
#: the jobs a worker holds unrun, and heartbeats, stay bounded.
MAX_PREFETCH = 10_000


class Pace:
    """The worker's start rate and lease round trip, and the prefetch they call for.

    ``clock`` returns seconds (the event loop's ``time``); tests pass their own. Not
    thread-safe: it lives on the worker's event loop.
    """

    #: Round trips' worth of jobs kept buffered.
    MARGIN = 4.0
    #: Shortest window over which the start rate is measured, in seconds: shorter ones are
    #: too noisy (a lease answer starts a whole batch at one instant).
    WINDOW = 0.05
    #: A window at least this long replaces the average outright, so a worker that went
    #: idle does not keep a large buffer for its next burst's first leases.
    QUIET = 4 * WINDOW

    def __init__(self, cap: int, clock: Callable[[], float]) -> None:
        if cap < 0:
            raise ValueError("the prefetch cap cannot be negative")
        self.cap = cap
        self._clock = clock
        #: Jobs started since ``_since``.
        self._count = 0
        self._since = clock()
        #: Jobs started per second (moving average over windows of at least WINDOW).
        self.rate = 0.0
        #: A lease's round trip in seconds (moving average: 0.8 old, 0.2 new).
        self.rtt = 0.001
        #: The slow-start floor under the prefetch (see the module docs).
        self.floor = 0

    def started(self, n: int) -> None:
        """Counts ``n`` jobs started now (0 just lets a window that ran out close)."""
        self._count += n
        now = self._clock()
        elapsed = now - self._since
        if elapsed >= self.WINDOW:
            sample = self._count / elapsed
            keep = 0.0 if elapsed >= self.QUIET else 0.5
            self.rate = keep * self.rate + (1.0 - keep) * sample
            self._count = 0
            self._since = now

    def leased(self, took: float) -> None:
        """Counts one lease round trip of ``took`` seconds."""
        self.rtt = 0.8 * self.rtt + 0.2 * max(0.0, took)

    def answered(self, full: bool, starving: bool) -> None:
        """Counts how a lease answered: ``full`` when it brought every job it asked for
        (more may be waiting), ``starving`` when the slots had run out of buffered work by
        then (nothing buffered, a slot free). Both: the slow-start floor doubles, up to the
        cap. Otherwise it halves."""
        if full and starving:
            self.floor = min(max(self.floor * 2, 1), max(self.cap, 1))
        else:
            self.floor //= 2

    def prefetch(self) -> int:
        """Jobs to hold beyond the slots right now: 0 when prefetch is off, else
        ``clamp(max(ceil(rate × rtt × MARGIN), floor), 1, cap)``."""
        if self.cap == 0:
            return 0
        want = max(math.ceil(self.rate * self.rtt * self.MARGIN), self.floor)
        return min(max(want, 1), self.cap)
