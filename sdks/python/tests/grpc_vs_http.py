"""Measure the Python SDK's HTTP transport against grpcio for one job per request (not a
pytest test): the measurement behind the SDK's choice of transport (docs/grpc.md).

    python sdks/python/tests/grpc_vs_http.py http://127.0.0.1:8080 127.0.0.1:50051 \
        [--calls 5000] [--threads 1,8]

Needs ``grpcio`` and ``grpcio-tools`` besides the SDK (the stubs are generated from
``proto/keel/v1/keel.proto`` into a temporary directory). For each thread count it sends
``--calls`` enqueues into a queue of its own (``py-transport-<random>``, one the server
does not serve, so nothing runs them) through ``keel.Client.enqueue`` and through
``JobService/Enqueue``, one job per call, and prints calls per second and the latency
percentiles of each.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import statistics
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable, List, Tuple

import keel

PROTO_ROOT = pathlib.Path(__file__).resolve().parents[3] / "proto"


def grpc_stubs(out: pathlib.Path):
    """Generates and imports keel.v1's message and service modules. The file is compiled
    under another name (``keel_v1.proto``): as ``keel/v1/keel.proto`` its modules would be
    ``keel.v1.…``, inside the SDK's own package ``keel``. The package, and so every method's
    path, stays ``keel.v1``."""
    import grpc_tools  # type: ignore[import-not-found]
    from grpc_tools import protoc  # type: ignore[import-not-found]

    source = out / "in"
    source.mkdir()
    (source / "keel_v1.proto").write_text((PROTO_ROOT / "keel/v1/keel.proto").read_text())
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    code = protoc.main(
        [
            "protoc",
            f"-I{source}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(source / "keel_v1.proto"),
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed ({code})")
    sys.path.insert(0, str(out))
    return importlib.import_module("keel_v1_pb2"), importlib.import_module("keel_v1_pb2_grpc")


def run(calls: int, threads: int, one: Callable[[], None]) -> Tuple[float, List[float]]:
    """Sends ``calls`` calls of ``one`` from ``threads`` threads; the rate and latencies."""
    latencies: List[float] = []
    lock = threading.Lock()
    per_thread = calls // threads

    def loop() -> None:
        mine = []
        for _ in range(per_thread):
            started = time.perf_counter()
            one()
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, latencies


def report(name: str, threads: int, rate: float, latencies: List[float]) -> None:
    q = statistics.quantiles(latencies, n=100)
    print(
        f"{name:5} {threads:2} threads: {rate:7.0f} calls/s, "
        f"p50 {q[49] * 1000:.2f} ms, p99 {q[98] * 1000:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("http")
    parser.add_argument("grpc")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--threads", default="1,8")
    a = parser.parse_args()

    import grpc  # type: ignore[import-not-found]

    with tempfile.TemporaryDirectory() as tmp:
        pb, pb_grpc = grpc_stubs(pathlib.Path(tmp))
        queue = f"py-transport-{uuid.uuid4().hex[:8]}"
        client = keel.Client(a.http)
        channel = grpc.insecure_channel(a.grpc)
        stub = pb_grpc.JobServiceStub(channel)
        request = pb.EnqueueRequest(job=pb.JobSpec(kind="noop", queue=queue, args='{"n": 1}'))

        def over_http() -> None:
            client.enqueue("noop", {"n": 1}, queue=queue)

        def over_grpc() -> None:
            stub.Enqueue(request)

        # Warm both up (connections, the server's caches) before measuring.
        run(200, 1, over_http)
        run(200, 1, over_grpc)
        for threads in (int(t) for t in a.threads.split(",")):
            report("http", threads, *run(a.calls, threads, over_http))
            report("grpc", threads, *run(a.calls, threads, over_grpc))
        client.close()
        channel.close()


if __name__ == "__main__":
    main()
