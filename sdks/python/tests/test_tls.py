"""The clients and the worker against a `keel serve` serving TLS, with a private CA.

The certificates are made with the ``openssl`` command line for each module run: a CA, and
a server certificate it signs for ``IP:127.0.0.1`` and ``DNS:localhost`` (the server checks
its pair at startup; the clients check the certificate against ``ca_cert``). A second CA
signs nothing the server serves. Every server here is SQLite: TLS sits in front of the
API, whatever the backend.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple

import pytest
from keel_server import KeelServer, ServerError, services_required
from support import DEADLINE, WorkerThread, require_module

import keel

#: A queue no built-in worker serves (the servers run with KEEL_QUEUES=default:4).
QUEUE = "py-tls"
#: A short long poll, so a stopping test worker returns quickly.
POLL_WAIT = 2.0

_CA_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
x509_extensions = ca
[dn]
CN = {name}
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

_SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA that signed the server's certificate (a client's ca_cert)
    other_ca: Path  # a CA that signed nothing the server serves
    server_cert: Path  # KEEL_TLS_CERT
    server_key: Path  # KEEL_TLS_KEY
    ca_key: Path  # a PEM file that is not a certificate


def _openssl() -> str:
    exe = shutil.which("openssl") or "/usr/bin/openssl"
    if not Path(exe).is_file():
        if services_required():
            pytest.fail("KEEL_REQUIRE_SERVICES=1 but openssl is not installed", pytrace=False)
        pytest.skip("openssl is not installed (the TLS tests make their certificates with it)")
    return exe


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}")


def _make_ca(openssl: str, d: Path, name: str) -> Tuple[Path, Path]:
    config = d / f"{name}.cnf"
    config.write_text(_CA_CONFIG.format(name=f"Keel SDK test {name}"))
    cert, key = d / f"{name}.pem", d / f"{name}.key"
    _run(
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "2", "-config", str(config), "-keyout", str(key), "-out", str(cert),
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    openssl = _openssl()
    d = tmp_path_factory.mktemp("tls")
    ca, ca_key = _make_ca(openssl, d, "ca")
    other_ca, _ = _make_ca(openssl, d, "other-ca")
    key, csr, cert = d / "server.key", d / "server.csr", d / "server.pem"
    _run(
        openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(csr),
    )  # fmt: skip
    extensions = d / "server.ext"
    extensions.write_text(_SERVER_EXTENSIONS)
    _run(
        openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-set_serial", "2", "-days", "2", "-extfile", str(extensions), "-out", str(cert),
    )  # fmt: skip
    return Certs(ca=ca, other_ca=other_ca, server_cert=cert, server_key=key, ca_key=ca_key)


@pytest.fixture
def tls_server(keel_bin: Path, certs: Certs, tmp_path: Path) -> Iterator[KeelServer]:
    env = {"KEEL_TLS_CERT": str(certs.server_cert), "KEEL_TLS_KEY": str(certs.server_key)}
    try:
        srv = KeelServer(keel_bin, f"sqlite://{tmp_path / 'keel.db'}", env=env)
    except ServerError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        assert srv.tls and srv.url.startswith("https://127.0.0.1:"), srv.url
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, f"keel serve exited {code} after SIGTERM:\n{srv.output()}"


# ---------------------------------------------------------------------------------------
# HTTP


def test_enqueue_and_get_over_https_with_ca_cert(tls_server: KeelServer, certs: Certs) -> None:
    with keel.Client(tls_server.url, timeout=30, ca_cert=str(certs.ca)) as client:
        assert client.config.ca_cert == str(certs.ca)
        job = client.enqueue("echo", {"over": "https"})
        assert client.get(job.id).id == job.id
        done = client.wait(job.id, timeout=DEADLINE)
        assert (done.state, done.result) == ("completed", {"over": "https"})


def test_without_the_ca_the_certificate_is_refused(tls_server: KeelServer, certs: Certs) -> None:
    for ca_cert in (None, certs.other_ca):
        with keel.Client(tls_server.url, timeout=10, ca_cert=ca_cert) as client:
            with pytest.raises(keel.TransportError) as raised:
                client.get(str(uuid.uuid4()))
        err = raised.value
        assert err.status is None
        assert "certificate verify failed" in str(err).lower(), str(err)


def test_async_client_over_https_with_ca_cert(tls_server: KeelServer, certs: Certs) -> None:
    async def main() -> keel.Job:
        async with keel.AsyncClient(tls_server.url, ca_cert=certs.ca) as client:
            job = await client.enqueue("echo", [1, 2, 3])
            return await client.wait(job.id, timeout=DEADLINE)

    done = asyncio.run(main())
    assert (done.state, done.result) == ("completed", [1, 2, 3])

    async def without_ca() -> None:
        async with keel.AsyncClient(tls_server.url, timeout=10) as client:
            await client.queues()

    with pytest.raises(keel.TransportError):
        asyncio.run(without_ca())


# ---------------------------------------------------------------------------------------
# gRPC


def test_enqueue_over_grpc_with_tls_and_ca_cert(tls_server: KeelServer, certs: Certs) -> None:
    require_module("grpc", "'keel-sdk[grpc]'")
    assert tls_server.grpc_target is not None, "the test server's gRPC API is off"
    with keel.Client(
        tls_server.url, timeout=30, grpc_target=tls_server.grpc_target, ca_cert=certs.ca
    ) as client:
        job = client.enqueue("echo", {"over": "grpc+tls"})
        batch = client.enqueue_many([{"kind": "echo", "args": i} for i in range(3)])
        done = client.wait(job.id, timeout=DEADLINE)
        assert (done.state, done.result) == ("completed", {"over": "grpc+tls"})
        assert [client.wait(j.id, timeout=DEADLINE).result for j in batch] == [0, 1, 2]

    # grpcio's default roots do not hold the test CA: no answer, as over HTTP.
    with keel.Client(tls_server.url, timeout=10, grpc_target=tls_server.grpc_target) as client:
        with pytest.raises(keel.TransportError):
            client.enqueue("echo", None)


# ---------------------------------------------------------------------------------------
# the worker


@pytest.mark.parametrize("made_from", ["client", "url"])
def test_worker_runs_a_job_over_https(tls_server: KeelServer, certs: Certs, made_from: str) -> None:
    with keel.Client(tls_server.url, timeout=30, ca_cert=certs.ca) as client:
        if made_from == "client":
            worker = keel.Worker(client, queues=[QUEUE], poll_wait=POLL_WAIT)
        else:
            worker = keel.Worker(
                tls_server.url, queues=[QUEUE], poll_wait=POLL_WAIT, ca_cert=str(certs.ca)
            )
        seen: List[Any] = []

        @worker.handler("square")
        def square(ctx: keel.Context, args: Any) -> Any:
            seen.append(args)
            return {"square": args["n"] * args["n"]}

        with WorkerThread(worker):
            job = client.enqueue("square", {"n": 7}, queue=QUEUE)
            done = client.wait(job.id, timeout=DEADLINE)
        assert (done.state, done.result) == ("completed", {"square": 49})
        assert seen == [{"n": 7}]


# ---------------------------------------------------------------------------------------
# bad ca_cert: refused when the client is made


def test_a_bad_ca_cert_is_refused_at_construction(certs: Certs, tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("this is not a certificate\n")
    broken = tmp_path / "broken.pem"
    lines = certs.ca.read_text().splitlines()
    broken.write_text("\n".join([lines[0], "not base64 at all!", *lines[2:]]) + "\n")
    bad = [
        (tmp_path / "missing.pem", "cannot be read"),
        (tmp_path, "cannot be read"),  # a directory
        (not_pem, "holds no -----BEGIN CERTIFICATE-----"),
        (certs.ca_key, "holds no -----BEGIN CERTIFICATE-----"),  # a key, not a certificate
        (broken, "does not parse"),
    ]
    url = "https://127.0.0.1:1"
    for path, why in bad:
        makers: List[Callable[[Path], object]] = [
            lambda p: keel.Client(url, ca_cert=str(p)),
            lambda p: keel.Client(url, ca_cert=p, grpc_target="127.0.0.1:1"),
            lambda p: keel.AsyncClient(url, ca_cert=str(p)),
            lambda p: keel.Worker(url, queues=[QUEUE], ca_cert=str(p)),
        ]
        for make in makers:
            with pytest.raises(ValueError) as raised:
                make(path)
            assert str(path) in str(raised.value) and why in str(raised.value), raised.value
    with pytest.raises(ValueError):
        keel.Client(url, ca_cert="")


def test_ca_cert_settings(certs: Certs) -> None:
    # Read once and kept: the worker and the gRPC channel use the same certificates.
    with keel.Client("https://127.0.0.1:1", ca_cert=certs.ca) as client:
        config = client.config
        assert config.ca_cert == str(certs.ca)
        assert config.ca_pem is not None and "-----BEGIN CERTIFICATE-----" in config.ca_pem
        assert f"ca_cert={str(certs.ca)!r}" in repr(config)
        # A worker made from a client takes the client's, and no other.
        assert keel.Worker(client, queues=[QUEUE])._config is config
        with pytest.raises(ValueError):
            keel.Worker(client, queues=[QUEUE], ca_cert=certs.other_ca)
    # Without one, nothing changes; on an http:// URL it is read but unused.
    with keel.Client("https://127.0.0.1:1") as client:
        assert client.config.ca_cert is None and "ca_cert" not in repr(client.config)
    with keel.Client("http://127.0.0.1:1", ca_cert=certs.ca) as client:
        assert client.config.ca_cert == str(certs.ca)
