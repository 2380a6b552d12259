"""Fixtures: a real `keel serve` per test, on SQLite and (when configured) on Postgres.

- ``server``: a fresh server on a database of its own, parametrised over the backends. It is
  stopped with SIGTERM at teardown and must exit 0.
- Postgres runs when ``KEEL_TEST_DATABASE_URL`` is set (each server gets a schema
  ``keel_py_<uuid>``, dropped afterwards). Unset or unreachable, those tests are skipped,
  unless ``KEEL_REQUIRE_SERVICES=1``, which makes them fail.
- The binary comes from ``KEEL_BIN``, ``$CARGO_TARGET_DIR/debug/keel`` or
  ``~/.cache/keel-target/debug/keel``; without one every server test fails, saying so.
- ``grpc_client``: a client of ``server`` that enqueues over its gRPC API. It needs the
  ``grpc`` extra: without it the test is skipped, or fails under ``KEEL_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

import pytest
from keel_server import (
    TEST_DATABASE_URL,
    KeelServer,
    PgSchema,
    ServerError,
    find_binary,
    services_required,
)
from support import require_module

import keel

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="session")
def keel_bin() -> Path:
    try:
        return find_binary()
    except ServerError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite://{tmp_path / 'keel.db'}"
        return
    base = os.environ.get(TEST_DATABASE_URL, "")
    if not base:
        if services_required():
            pytest.fail(
                f"KEEL_REQUIRE_SERVICES=1 but {TEST_DATABASE_URL} is not set", pytrace=False
            )
        pytest.skip(f"{TEST_DATABASE_URL} is not set (Postgres tests need it)")
    try:
        schema = PgSchema(base)
    except ServerError as e:
        if services_required():
            pytest.fail(f"Postgres at {TEST_DATABASE_URL} is unreachable: {e}", pytrace=False)
        pytest.skip(f"Postgres at {TEST_DATABASE_URL} is unreachable: {e}")
    try:
        yield schema.url
    finally:
        schema.drop()


@pytest.fixture
def server(keel_bin: Path, database_url: str) -> Iterator[KeelServer]:
    try:
        srv = KeelServer(keel_bin, database_url)
    except ServerError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, f"keel serve exited {code} after SIGTERM:\n{srv.output()}"


@pytest.fixture
def client(server: KeelServer) -> Iterator[keel.Client]:
    with keel.Client(server.url, timeout=30) as c:
        yield c


@pytest.fixture
def grpc_client(server: KeelServer) -> Iterator[keel.Client]:
    require_module("grpc", "'keel-sdk[grpc]'")
    assert server.grpc_target is not None, "the test server's gRPC API is off"
    with keel.Client(server.url, timeout=30, grpc_target=server.grpc_target) as c:
        yield c


@pytest.fixture(autouse=True)
def _keel_logs(caplog: pytest.LogCaptureFixture) -> None:
    # The SDK's own log lines are part of a failing test's report.
    caplog.set_level(logging.INFO, logger="keel")
