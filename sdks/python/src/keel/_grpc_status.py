"""The details of a gRPC error: the ``google.rpc.Status`` of its ``grpc-status-details-bin``
trailer, with the ``ErrorInfo``, ``BadRequest`` and ``RetryInfo`` Keel puts in it.

Those messages come with googleapis-common-protos, a package the ``grpc`` extra does not
need otherwise; the four read here are decoded from the protobuf wire format directly (it
is fixed: field numbers and types never change). The decoder is lenient: a trailer that
does not decode yields empty details, never an exception, since it is only read while
reporting another error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple, Union

__all__ = ["StatusDetails", "status_details"]

_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"

_VARINT = 0
_FIXED64 = 1
_LENGTH = 2
_FIXED32 = 5


@dataclass
class StatusDetails:
    """What a Keel error says beyond its code and message.

    ``reason`` and ``domain`` come from ``ErrorInfo`` (``reason`` is the HTTP problem
    type's slug, ``domain`` ``keel.dev``), ``metadata`` from its map (``job_id``,
    ``state``); ``violations`` is ``BadRequest``'s ``(field, description)`` list;
    ``retry_delay`` is ``RetryInfo``'s, in seconds.
    """

    reason: Optional[str] = None
    domain: Optional[str] = None
    metadata: Dict[str, str] = field(default_factory=dict)
    violations: List[Tuple[str, str]] = field(default_factory=list)
    retry_delay: Optional[float] = None


class _Malformed(Exception):
    pass


def status_details(blob: bytes) -> StatusDetails:
    """The details of a serialised ``google.rpc.Status``; empty when it does not decode."""
    try:
        return _status(blob)
    except _Malformed:
        return StatusDetails()


def _status(blob: bytes) -> StatusDetails:
    out = StatusDetails()
    # google.rpc.Status: code = 1, message = 2, repeated google.protobuf.Any details = 3.
    for number, any_bytes in _fields(blob):
        if number != 3 or not isinstance(any_bytes, bytes):
            continue
        type_url, value = "", b""
        for n, v in _fields(any_bytes):
            if n == 1 and isinstance(v, bytes):
                type_url = _text(v)
            elif n == 2 and isinstance(v, bytes):
                value = v
        if type_url == _ERROR_INFO:
            _error_info(value, out)
        elif type_url == _BAD_REQUEST:
            _bad_request(value, out)
        elif type_url == _RETRY_INFO:
            out.retry_delay = _retry_delay(value)
    return out


def _error_info(blob: bytes, out: StatusDetails) -> None:
    # ErrorInfo: reason = 1, domain = 2, map<string, string> metadata = 3 (entries of
    # key = 1, value = 2).
    for number, v in _fields(blob):
        if not isinstance(v, bytes):
            continue
        if number == 1:
            out.reason = _text(v)
        elif number == 2:
            out.domain = _text(v)
        elif number == 3:
            key, value = "", ""
            for n, e in _fields(v):
                if n == 1 and isinstance(e, bytes):
                    key = _text(e)
                elif n == 2 and isinstance(e, bytes):
                    value = _text(e)
            out.metadata[key] = value


def _bad_request(blob: bytes, out: StatusDetails) -> None:
    # BadRequest: repeated FieldViolation field_violations = 1 (field = 1, description = 2).
    for number, v in _fields(blob):
        if number != 1 or not isinstance(v, bytes):
            continue
        name, description = "", ""
        for n, e in _fields(v):
            if n == 1 and isinstance(e, bytes):
                name = _text(e)
            elif n == 2 and isinstance(e, bytes):
                description = _text(e)
        out.violations.append((name, description))


def _retry_delay(blob: bytes) -> Optional[float]:
    # RetryInfo: google.protobuf.Duration retry_delay = 1 (seconds = 1, nanos = 2).
    for number, v in _fields(blob):
        if number != 1 or not isinstance(v, bytes):
            continue
        seconds, nanos = 0, 0
        for n, e in _fields(v):
            if n == 1 and isinstance(e, int):
                seconds = _signed(e)
            elif n == 2 and isinstance(e, int):
                nanos = _signed(e)
        delay = seconds + nanos / 1e9
        return delay if delay >= 0 else None
    return None


def _fields(blob: bytes) -> Iterator[Tuple[int, Union[int, bytes]]]:
    """``(field number, value)`` of each field: an int for varints, bytes otherwise."""
    i = 0
    while i < len(blob):
        key, i = _varint(blob, i)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, i = _varint(blob, i)
            yield number, value
        elif wire == _LENGTH:
            size, i = _varint(blob, i)
            if i + size > len(blob):
                raise _Malformed("a length runs past the end")
            yield number, blob[i : i + size]
            i += size
        elif wire == _FIXED64:
            yield number, blob[i : i + 8]
            i += 8
        elif wire == _FIXED32:
            yield number, blob[i : i + 4]
            i += 4
        else:
            raise _Malformed(f"wire type {wire}")
    if i != len(blob):
        raise _Malformed("a fixed-width field runs past the end")


def _varint(blob: bytes, i: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(blob) or shift > 63:
            raise _Malformed("a varint runs past the end")
        b = blob[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _signed(n: int) -> int:
    """An int64/int32 varint: negative numbers are sent as their 64-bit two's complement."""
    return n - (1 << 64) if n >= 1 << 63 else n


def _text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")
