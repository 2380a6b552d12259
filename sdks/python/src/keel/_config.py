"""What a client needs to reach a server, shared by the sync and async clients.

A :class:`keel.Worker` builds its own async transport from a client's settings rather than
borrowing the client's connection pool: an ``httpx`` pool belongs to one thread or one event
loop, and the worker runs on a loop of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

from ._version import __version__

USER_AGENT = f"keel-python/{__version__}"


@dataclass(frozen=True)
class ClientConfig:
    """The base URL, API key and network timeout of a client."""

    url: str
    api_key: Optional[str] = None
    timeout: float = 30.0

    @classmethod
    def make(cls, url: str, api_key: Optional[str], timeout: float) -> "ClientConfig":
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"the Keel URL must start with http:// or https://, got {url!r}")
        timeout = float(timeout)
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        return cls(url.rstrip("/"), api_key or None, timeout)

    def headers(self) -> Dict[str, str]:
        h = {"user-agent": USER_AGENT, "accept": "application/json"}
        if self.api_key:
            h["authorization"] = f"Bearer {self.api_key}"
        return h

    def __repr__(self) -> str:
        # The key is a secret: never in a repr that may end up in a log line.
        key = "set" if self.api_key else "none"
        return f"ClientConfig(url={self.url!r}, api_key={key}, timeout={self.timeout!r})"
