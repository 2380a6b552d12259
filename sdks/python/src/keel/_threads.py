"""A small pool of daemon threads for plain (non-async) handlers.

``concurrent.futures.ThreadPoolExecutor`` joins its threads when the interpreter exits, so
one handler that ignores its cancellation would keep a stopped worker's process alive after
its grace period, until an orchestrator SIGKILLs it. By then the worker has released that
handler's job (another worker will run it), so nothing is lost by not waiting: these
threads are daemons, and a stopped worker exits on time.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, List, Optional, Tuple, TypeVar

T = TypeVar("T")

_Item = Optional[Tuple["Future[Any]", Callable[[], Any]]]


class DaemonPool:
    """Runs callables on up to ``size`` daemon threads, started as they are needed."""

    def __init__(self, size: int, name: str) -> None:
        if size < 1:
            raise ValueError("a pool needs at least one thread")
        self._size = size
        self._name = name
        self._queue: "queue.SimpleQueue[_Item]" = queue.SimpleQueue()
        self._threads: List[threading.Thread] = []
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., T], *args: Any) -> "Future[T]":
        """Runs ``fn(*args)`` on a pool thread, in a copy of the caller's context variables."""
        fut: "Future[T]" = Future()
        ctx = contextvars.copy_context()
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool is shut down")
            self._queue.put((fut, lambda: ctx.run(fn, *args)))
            # An idle thread will take the item; otherwise start one while under the size.
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._size:
                t = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(t)
                t.start()
        return fut

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, call = item
            del item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(call())
                except BaseException as e:  # handed to the awaiting coroutine
                    fut.set_exception(e)
            del fut, call
            self._idle.release()

    def shutdown(self) -> None:
        """Lets idle threads exit; busy ones finish their call first. Does not wait."""
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)
