"""Length-prefixed JSON framing between the host and a sandboxed child (never pickle).

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON. The receiver refuses
frames over MAX_MESSAGE before reading them, so a child cannot make the host buffer an unbounded reply.

numpy arrays travel as a tagged object ``{"__ndarray__": <base64>, "dtype": "float32", "shape": [..]}``
(numeric dtypes only) and numpy scalars as plain numbers; both directions decode the tag back into an
array. NaN and infinity are not JSON and are refused.

Bytes are not the only bound: 8 MB of `[]` decodes into 2.7 million lists (over 200 MB). Before parsing,
a frame is checked for what it may expand into (MAX_ITEMS values, MAX_CONTAINERS lists/objects, nesting
depth MAX_DEPTH), and nothing a peer sends can make `decode` raise anything but ProtocolError.
"""
from __future__ import annotations

import base64
import json
import re
import socket
import struct
import sys
import time

MAX_MESSAGE = 8 * 1024 * 1024  # bytes per frame, both directions
MAX_LOGS = 64 * 1024  # characters of captured print output per run
_HEADER = struct.Struct(">I")
# Numeric dtypes only: an object dtype built from bytes would hand out raw pointers.
_DTYPES = frozenset(
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64 complex64 complex128".split()
)
_TAG_KEYS = frozenset(("__ndarray__", "dtype", "shape"))
MAX_DEPTH = 64  # nesting of lists/objects in one message
MAX_CONTAINERS = 100_000  # lists and objects in one message
MAX_ITEMS = 500_000  # values of any kind in one message (~40 MB of Python objects at most)
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_INNERMOST = re.compile(rb"\[\]|\{\}")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[]{},')


class ProtocolError(Exception):
    """The peer broke the framing rules (oversized frame, bad JSON, unexpected message)."""


class PeerClosed(Exception):
    """The peer closed its end (usually: the child died)."""


class DeadlineExceeded(Exception):
    """The wall-clock deadline passed while waiting for the peer."""


def _default(obj: object) -> object:
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.ndarray):
            if obj.dtype.name not in _DTYPES:
                raise TypeError(f"numpy array of dtype {obj.dtype.name} cannot cross the sandbox boundary")
            data = base64.b64encode(np.ascontiguousarray(obj).tobytes()).decode("ascii")
            return {"__ndarray__": data, "dtype": obj.dtype.name, "shape": list(obj.shape)}
        if isinstance(obj, np.generic):
            return obj.item()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _hook(obj: dict) -> object:
    if obj.keys() == _TAG_KEYS:
        dtype, shape = obj["dtype"], obj["shape"]
        if dtype not in _DTYPES or not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise ProtocolError(f"bad ndarray encoding (dtype={dtype!r}, shape={shape!r})")
        import numpy as np

        data = obj["__ndarray__"]
        if not isinstance(data, str):
            raise ProtocolError(f"bad ndarray encoding: data must be base64 text, got {type(data).__name__}")
        raw = base64.b64decode(data, validate=True)
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    return obj


def _outside_strings(data: bytes) -> bytes:
    """The brackets, braces and commas of `data` that are not inside a JSON string. Without a
    backslash, strings are exactly '"[^"]*"', so splitting at quotes finds them (4x faster than the
    string pattern, which is used when escapes are present)."""
    if b"\\" in data:
        return _STRING.sub(b"", data)
    return b"".join(data.translate(None, _NOT_STRUCTURE).split(b'"')[0::2])


def check_expansion(data: bytes) -> None:
    """Refuse a JSON frame that would decode into more than MAX_ITEMS values, MAX_CONTAINERS lists or
    objects, or nesting deeper than MAX_DEPTH. Counts at C speed, without building any object."""
    opens = data.count(b"[") + data.count(b"{")
    if opens <= MAX_DEPTH and data.count(b",") + opens < MAX_ITEMS:
        return  # the common small message: structure characters alone prove it is within bounds
    bare = _outside_strings(data)  # brackets and commas inside strings are not structure
    containers = bare.count(b"[") + bare.count(b"{")
    items = containers + bare.count(b",") + 1  # every value but a container's first follows a comma
    if containers > MAX_CONTAINERS:
        raise ProtocolError(f"message holds {containers} lists/objects, over the {MAX_CONTAINERS} limit")
    if items > MAX_ITEMS:
        raise ProtocolError(f"message holds about {items} values, over the {MAX_ITEMS} limit")
    if containers > MAX_DEPTH:
        brackets = bare.translate(None, _NOT_BRACKETS)
        for _ in range(MAX_DEPTH):  # each pass peels one level; bounded by MAX_CONTAINERS bytes each
            brackets = _INNERMOST.sub(b"", brackets)
            if not brackets:
                return
        if _INNERMOST.search(brackets):
            raise ProtocolError(f"message nests lists/objects deeper than {MAX_DEPTH} levels")


def encode(obj: object) -> bytes:
    """Serialise one message; raises TypeError/ValueError for values that are not JSON."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, default=_default).encode("utf-8")


def decode(data: bytes) -> object:
    """Parse one frame; whatever the bytes are, the only exception is ProtocolError."""
    check_expansion(data)
    try:
        return json.loads(data.decode("utf-8"), object_hook=_hook)
    except ProtocolError:
        raise
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:  # ValueError: bad UTF-8/JSON/base64
        raise ProtocolError(f"bad json: {type(exc).__name__}: {str(exc)[:200]}") from None


def frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


class Channel:
    """One end of a SOCK_STREAM socket speaking framed JSON. `deadline` is a time.monotonic() value."""

    def __init__(self, sock: socket.socket, max_message: int = MAX_MESSAGE):
        self.sock = sock
        self.max_message = max_message

    def send(self, obj: object, deadline: float | None = None) -> None:
        self.send_bytes(encode(obj), deadline)

    def send_bytes(self, payload: bytes, deadline: float | None = None) -> None:
        self._settimeout(deadline)
        try:
            self.sock.sendall(frame(payload))
        except socket.timeout:
            raise DeadlineExceeded("deadline passed while sending") from None
        except (BrokenPipeError, ConnectionResetError):
            raise PeerClosed("peer closed the channel") from None

    def recv(self, deadline: float | None = None) -> object:
        (size,) = _HEADER.unpack(self._recv_exact(_HEADER.size, deadline))
        if size > self.max_message:
            raise ProtocolError(f"message too large: {size} bytes exceeds the {self.max_message}-byte cap")
        return decode(self._recv_exact(size, deadline))

    def _settimeout(self, deadline: float | None) -> None:
        if deadline is None:
            self.sock.settimeout(None)
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded("deadline passed")
            self.sock.settimeout(remaining)

    def _recv_exact(self, n: int, deadline: float | None) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            self._settimeout(deadline)
            try:
                k = self.sock.recv_into(view[got:])
            except socket.timeout:
                raise DeadlineExceeded("deadline passed while receiving") from None
            except ConnectionResetError:
                k = 0
            if k == 0:
                raise PeerClosed("peer closed the channel" + (" mid-message" if got else ""))
            got += k
        return bytes(buf)
