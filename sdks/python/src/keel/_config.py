"""What a client needs to reach a server, shared by the sync and async clients.

A :class:`keel.Worker` builds its own async transport from a client's settings rather than
borrowing the client's connection pool: an ``httpx`` pool belongs to one thread or one event
loop, and the worker runs on a loop of its own.
"""

from __future__ import annotations

import math
import os
import re
import ssl
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Union

import httpx

from ._version import __version__

USER_AGENT = f"keel-python/{__version__}"

#: What a ``ca_cert`` may be given as: a path, as a string or a path-like object.
CaCertPath = Union[str, "os.PathLike[str]"]

_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)


@dataclass(frozen=True)
class ClientConfig:
    """The base URL, API key, network timeout and extra trusted CA of a client.

    ``ca_cert`` is the path of the PEM file given to the client, and ``ca_pem`` the
    certificates read from it when the client was made: every transport built from this
    config (the client's, a worker's, the gRPC channel) trusts those, so a file changed or
    removed afterwards changes nothing.
    """

    url: str
    api_key: Optional[str] = None
    timeout: float = 30.0
    ca_cert: Optional[str] = None
    ca_pem: Optional[str] = field(default=None, repr=False)

    @classmethod
    def make(
        cls,
        url: str,
        api_key: Optional[str],
        timeout: float,
        ca_cert: Optional[CaCertPath] = None,
    ) -> "ClientConfig":
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"the Keel URL must start with http:// or https://, got {url!r}")
        timeout = float(timeout)
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        path: Optional[str] = None
        pem: Optional[str] = None
        if ca_cert is not None:
            path, pem = read_ca_cert(ca_cert)
        return cls(url.rstrip("/"), api_key or None, timeout, path, pem)

    @property
    def tls(self) -> bool:
        """Whether the URL is ``https://``."""
        return self.url.startswith("https://")

    def headers(self) -> Dict[str, str]:
        h = {"user-agent": USER_AGENT, "accept": "application/json"}
        if self.api_key:
            h["authorization"] = f"Bearer {self.api_key}"
        return h

    def verify(self) -> Union[ssl.SSLContext, bool]:
        """httpx's ``verify`` argument: ``True`` (httpx's default roots) without a
        ``ca_cert``, else a new context trusting the same default roots plus ``ca_cert``'s
        certificates."""
        if self.ca_pem is None:
            return True
        # httpx's own default context (certifi's roots, or SSL_CERT_FILE / SSL_CERT_DIR
        # when set), so that the CA is trusted on top of what the client trusts without it.
        ctx = httpx.create_ssl_context()
        ctx.load_verify_locations(cadata=self.ca_pem)
        return ctx

    def __repr__(self) -> str:
        # The key is a secret: never in a repr that may end up in a log line.
        key = "set" if self.api_key else "none"
        ca = f", ca_cert={self.ca_cert!r}" if self.ca_cert is not None else ""
        return f"ClientConfig(url={self.url!r}, api_key={key}, timeout={self.timeout!r}{ca})"


def read_ca_cert(ca_cert: CaCertPath) -> Tuple[str, str]:
    """``ca_cert``'s path as a string, and the PEM ``CERTIFICATE`` blocks of the file.

    Raises :class:`ValueError` naming the path when the file cannot be read, holds no PEM
    certificate, or holds one that does not parse.
    """
    try:
        path = os.fsdecode(os.fspath(ca_cert))
    except TypeError:
        raise ValueError(
            f"ca_cert must be the path of a PEM file of CA certificates, got {ca_cert!r}"
        ) from None
    if not path:
        raise ValueError("ca_cert must be the path of a PEM file of CA certificates, got ''")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"ca_cert {path!r} cannot be read: {e.strerror or e}") from e
    # PEM is ASCII; text around the blocks (openssl's subject lines, comments) is ignored.
    blocks = _PEM_CERTIFICATE.findall(data.decode("latin-1"))
    if not blocks:
        raise ValueError(
            f"ca_cert {path!r} is not a PEM file of CA certificates: it holds no "
            "-----BEGIN CERTIFICATE----- block"
        )
    blocks = [b.replace("\r\n", "\n") for b in blocks]
    for i, block in enumerate(blocks):
        # One at a time: OpenSSL reading several stops quietly at the first bad one.
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=block)
        except ssl.SSLError as e:
            raise ValueError(
                f"ca_cert {path!r} is not a PEM file of CA certificates: its certificate "
                f"#{i + 1} does not parse ({e.reason or e})"
            ) from e
    return path, "\n".join(blocks) + "\n"
