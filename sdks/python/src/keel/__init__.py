"""Keel for Python: enqueue and inspect jobs, and run workers for them.

>>> import keel
>>> with keel.Client("http://127.0.0.1:8080") as client:
...     job = client.enqueue("echo", {"hello": "world"})
...     client.wait(job.id, timeout=30).result
{'hello': 'world'}

A worker serves queues the server does not run itself::

    worker = keel.Worker("http://127.0.0.1:8080", queues=["emails"], concurrency=8)

    @worker.handler("send_email")
    def send_email(ctx, args):
        ...
        return {"sent": True}

    worker.run()  # until SIGTERM/SIGINT or worker.stop()

The SDK logs through the ``keel`` logger (``keel.worker``, ``keel.job``) and never prints.
"""

import logging as _logging

from ._protocol import Completion, Failure, JobSpec, Seconds
from ._version import __version__
from .aio import AsyncClient
from .client import Client
from .context import Context
from .errors import (
    FieldError,
    KeelError,
    MissingDependency,
    PermanentError,
    RetryIn,
    TransportError,
    WaitTimeout,
)
from .models import (
    TERMINAL_STATES,
    AttemptError,
    Heartbeat,
    Job,
    JobPage,
    JobResult,
    JobState,
    Lease,
    OutcomeResult,
    QueueInfo,
    WorkerInfo,
)
from .worker import Handler, Worker

# A library leaves output to the application: without its own logging set up, nothing from
# Keel reaches stderr (the standard NullHandler convention).
_logging.getLogger("keel").addHandler(_logging.NullHandler())

__all__ = [
    "__version__",
    "AsyncClient",
    "AttemptError",
    "Client",
    "Completion",
    "Context",
    "Failure",
    "FieldError",
    "Handler",
    "Heartbeat",
    "Job",
    "JobPage",
    "JobResult",
    "JobSpec",
    "JobState",
    "KeelError",
    "Lease",
    "MissingDependency",
    "OutcomeResult",
    "PermanentError",
    "QueueInfo",
    "RetryIn",
    "Seconds",
    "TERMINAL_STATES",
    "TransportError",
    "WaitTimeout",
    "Worker",
    "WorkerInfo",
]
