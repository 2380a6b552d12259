"""`keel serve` as a child process, on a database of its own, for the SDK tests.

The server is the real binary (no fake, no mock): found through ``KEEL_BIN``, else
``$CARGO_TARGET_DIR/debug/keel``, else ``~/.cache/keel-target/debug/keel``. It binds
ephemeral ports for its HTTP and gRPC APIs, and the test reads both addresses from its
``"keel is serving"`` JSON log line (``addr`` and ``grpc_addr``, and ``tls`` for the URL's
scheme), as the Rust tests do (crates/keel/tests/it/child.rs).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Deque, Dict, List, Mapping, Optional

#: How long a server may take to announce itself (a cold Postgres connect and migrations).
STARTUP_SECONDS = 60.0
#: How long a SIGTERMed server may take to exit.
STOP_SECONDS = 60.0
#: Log lines kept per server, for failure messages.
KEPT_LINES = 2000

REQUIRE_SERVICES = "KEEL_REQUIRE_SERVICES"
TEST_DATABASE_URL = "KEEL_TEST_DATABASE_URL"


class ServerError(Exception):
    """The server could not be found, did not start, or did not stop cleanly."""


def services_required() -> bool:
    return os.environ.get(REQUIRE_SERVICES, "").lower() in ("1", "true")


def find_binary() -> Path:
    """The `keel` binary to test against, or a :class:`ServerError` saying how to get one."""
    candidates: List[Path] = []
    if os.environ.get("KEEL_BIN"):
        candidates.append(Path(os.environ["KEEL_BIN"]))
    else:
        if os.environ.get("CARGO_TARGET_DIR"):
            candidates.append(Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / "keel")
        candidates.append(Path.home() / ".cache" / "keel-target" / "debug" / "keel")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise ServerError(
        f"no keel binary found (tried {tried}). Build it with `cargo build -p keel` "
        "(CARGO_TARGET_DIR decides where it lands) or point KEEL_BIN at one."
    )


def serving_addr(line: str) -> Optional[str]:
    """The API address of a "keel is serving" JSON log line, else None."""
    fields = serving_fields(line)
    return fields.get("addr") if fields is not None else None


def serving_fields(line: str) -> Optional[Dict[str, str]]:
    """The string fields of a "keel is serving" JSON log line (``addr``, ``grpc_addr``,
    which is ``off`` when the gRPC API is), and its booleans as ``"true"``/``"false"``
    (``tls``), else None."""
    try:
        v = json.loads(line)
    except ValueError:
        return None
    if not isinstance(v, dict):
        return None
    nested = v.get("fields")
    fields: Dict[str, object] = nested if isinstance(nested, dict) else {}
    merged = {**fields, **v}
    if merged.get("message") != "keel is serving":
        return None
    out = {k: value for k, value in merged.items() if isinstance(value, str)}
    out.update({k: str(value).lower() for k, value in merged.items() if isinstance(value, bool)})
    return out


class KeelServer:
    """A running `keel serve`; :meth:`stop` SIGTERMs it and returns its exit code.

    ``env`` adds to (or overrides) the test settings below. With ``KEEL_TLS_CERT`` and
    ``KEEL_TLS_KEY`` in it the server serves TLS, and :attr:`url` is ``https://``.
    """

    def __init__(self, binary: Path, database_url: str, env: Optional[Mapping[str, str]] = None):
        child_env: Dict[str, str] = {
            k: v for k, v in os.environ.items() if not k.startswith("KEEL_")
        }
        child_env.update(
            {
                "KEEL_DATABASE_URL": database_url,
                "KEEL_ADDR": "127.0.0.1:0",
                "KEEL_ADMIN_ADDR": "off",
                "KEEL_GRPC_ADDR": "127.0.0.1:0",
                "KEEL_LOG_FORMAT": "json",
                "KEEL_MAINTENANCE_INTERVAL": "200ms",
                # `default` is served by the built-in executors; every other queue (py-work…)
                # is left to external workers.
                "KEEL_QUEUES": "default:4",
            }
        )
        child_env.update(env or {})
        self._lines: Deque[str] = collections.deque(maxlen=KEPT_LINES)
        self._announced = threading.Event()
        self._served: Optional[Dict[str, str]] = None
        self._proc = subprocess.Popen(
            [str(binary), "serve"],
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        # Read every line, always: a full pipe would block the server's logging.
        self._reader = threading.Thread(target=self._read, name="keel-log-reader", daemon=True)
        self._reader.start()
        if not self._announced.wait(STARTUP_SECONDS) or self._served is None:
            self._proc.kill()
            self._proc.wait()
            raise ServerError(
                f"keel serve did not announce its address within {STARTUP_SECONDS:g}s "
                f"(exit code {self._proc.returncode}); its output:\n{self.output()}"
            )
        #: Whether every listener serves TLS (``KEEL_TLS_CERT`` and ``KEEL_TLS_KEY`` in
        #: ``env``), as the serving line says.
        self.tls: bool = self._served.get("tls") == "true"
        scheme = "https" if self.tls else "http"
        self.url: str = f"{scheme}://{self._served['addr']}"
        grpc_addr = self._served.get("grpc_addr", "off")
        #: The gRPC API's ``host:port`` (a client's ``grpc_target``); None when it is off.
        self.grpc_target: Optional[str] = None if grpc_addr == "off" else grpc_addr

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            line = line.rstrip("\n")
            self._lines.append(line)
            if not self._announced.is_set():
                served = serving_fields(line)
                if served is not None and "addr" in served:
                    self._served = served
                    self._announced.set()
        # The process closed its output (it exited): stop waiting for an announcement.
        self._announced.set()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def output(self, last: int = 60) -> str:
        """The server's last log lines."""
        return "\n".join(list(self._lines)[-last:])

    def stop(self) -> int:
        """SIGTERM, then the exit code (the server is SIGKILLed after STOP_SECONDS)."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
        try:
            code = self._proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            raise ServerError(
                f"keel serve did not exit within {STOP_SECONDS:g}s of SIGTERM:\n{self.output()}"
            ) from None
        self._reader.join(5)
        return code


class PgSchema:
    """A fresh Postgres schema for one server, dropped afterwards.

    Made with `psql`, so the tests need no Postgres driver; the server sees only this schema
    through ``options=-csearch_path=<schema>`` in its URL.
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.name = f"keel_py_{uuid.uuid4().hex}"
        psql(base_url, f"CREATE SCHEMA {self.name}")
        sep = "&" if "?" in base_url else "?"
        self.url = f"{base_url}{sep}options=-csearch_path%3D{self.name}"

    def drop(self) -> None:
        psql(self.base_url, f"DROP SCHEMA IF EXISTS {self.name} CASCADE")


def psql(url: str, sql: str) -> None:
    exe = shutil.which("psql")
    if exe is None:
        raise ServerError("psql is not installed (the Postgres tests create their schema with it)")
    done = subprocess.run(
        [exe, url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise ServerError(f"psql failed ({done.returncode}): {done.stderr.strip()}")
