"""The PROXY protocol (HAProxy's, versions 1 and 2), receiving side, sans-I/O.

A TCP load balancer in front of a server (HAProxy ``send-proxy`` /
``send-proxy-v2``, nginx ``proxy_protocol on``, Envoy, cloud load
balancers) opens each connection to the server with one header saying whom
it relays: the client's address and port.  The server reads that header
before anything else from a *trusted* proxy's connection, and from then on
treats the connection as the client's (logs, per-source limits,
``remote_address``).

:class:`ProxyHeaderReader` takes the connection's first bytes and returns
the header's :class:`ProxyInfo` and the bytes after it (the client's own),
or raises :class:`ProxyHeaderError`: a header that is malformed, too long,
of an unknown version or command, or missing (the first bytes cannot begin
one).  It decides as early as the bytes allow: a stranger's bytes are
refused at the first byte that cannot belong to a header, and it never
buffers more than :data:`MAX_HEADER` bytes.

- Version 1: one line of text, ``PROXY TCP4|TCP6 <src> <dst> <sport>
  <dport>\\r\\n`` (at most 107 bytes), or ``PROXY UNKNOWN ...\\r\\n``.
- Version 2: a 16-byte binary header (the 12-byte signature, version and
  command, family and transport, a length), the addresses, then TLVs,
  which are skipped (their layout is checked).  ``LOCAL`` (the proxy's own
  health check) and ``UNSPEC``, ``UNIX`` or datagram families carry no
  client address: the connection's own address stands.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from .errors import RemoteProtocolError
from .wire import printable

__all__ = [
    "MAX_HEADER",
    "V1_MAX",
    "V2_SIGNATURE",
    "ProxyHeaderError",
    "ProxyHeaderReader",
    "ProxyInfo",
    "looks_like_proxy_header",
]

V1_PREFIX = b"PROXY "
#: A version-1 line is at most this long, its CRLF included.
V1_MAX = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_HEAD = struct.Struct(">BBH")  # version and command, family and transport, length
V2_HEADER_SIZE = len(V2_SIGNATURE) + _V2_HEAD.size  # 16
#: The longest version-2 header accepted, TLVs included (HAProxy's own,
#: with its SSL and unique-id TLVs, stays far below).
MAX_HEADER = 4096

_PORT = r"(?:0|[1-9][0-9]{0,4})"
_V1_LINE = re.compile(
    rb"PROXY (TCP4|TCP6) ([0-9A-Fa-f:.]{2,45}) ([0-9A-Fa-f:.]{2,45}) ("
    + _PORT.encode()
    + rb") ("
    + _PORT.encode()
    + rb")\r\n"
)

Address = Tuple[str, int]


class ProxyHeaderError(RemoteProtocolError):
    """The PROXY protocol header is missing, malformed or not accepted."""


@dataclass(frozen=True)
class ProxyInfo:
    """What a PROXY header said.  ``source`` is the client's (host, port),
    ``destination`` the address it connected to; both None when the header
    carries none (v1 UNKNOWN, v2 LOCAL or a family without addresses): the
    connection's own endpoints stand."""

    version: int
    source: Optional[Address]
    destination: Optional[Address]
    #: v2's LOCAL command: the proxy's own connection, such as its health check.
    local: bool = False


def looks_like_proxy_header(first: bytes) -> bool:
    """Do these first bytes begin a PROXY header (either version)?"""
    return bool(first) and (
        V1_PREFIX.startswith(first[: len(V1_PREFIX)])
        or V2_SIGNATURE.startswith(first[: len(V2_SIGNATURE)])
    )


class ProxyHeaderReader:
    """The header at the start of a connection (see the module docstring)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: Union[bytes, bytearray, memoryview]) -> Optional[Tuple[ProxyInfo, bytes]]:
        """The bytes read so far (``b""``: the end of the stream).  None: more
        are needed; else the header and the bytes that follow it.

        Raises:
            ProxyHeaderError: no valid header can begin or end here.
        """
        if not data:
            raise ProxyHeaderError(
                "the proxy closed the connection before a whole PROXY protocol header"
                f" ({len(self._buf)} bytes of it)"
            )
        self._buf += data
        buf = self._buf
        if buf[:1] == b"P":
            return self._v1()
        if buf[:1] == b"\r":
            return self._v2()
        raise ProxyHeaderError(_missing(bytes(buf[:16])))

    def _v1(self) -> Optional[Tuple[ProxyInfo, bytes]]:
        buf = self._buf
        if not V1_PREFIX.startswith(bytes(buf[: len(V1_PREFIX)])):
            raise ProxyHeaderError(_missing(bytes(buf[:16])))
        end = buf.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(buf) >= V1_MAX or b"\n" in buf[:V1_MAX]:
                raise ProxyHeaderError(
                    "a PROXY protocol v1 line must end with CRLF within 107 bytes"
                )
            return None
        line, rest = bytes(buf[: end + 2]), bytes(buf[end + 2 :])
        buf.clear()
        if line.startswith(b"PROXY UNKNOWN") and line[13:14] in (b" ", b"\r"):
            return ProxyInfo(1, None, None), rest
        match = _V1_LINE.fullmatch(line)
        if match is None:
            shown = printable(line[:-2].decode("latin-1"))
            raise ProxyHeaderError(f"malformed PROXY protocol v1 line ('{shown}')")
        family = 4 if match[1] == b"TCP4" else 6
        src = _ip(match[2].decode(), family)
        dst = _ip(match[3].decode(), family)
        sport, dport = int(match[4]), int(match[5])
        if sport > 0xFFFF or dport > 0xFFFF:
            raise ProxyHeaderError("a PROXY protocol v1 port is over 65535")
        return ProxyInfo(1, (src, sport), (dst, dport)), rest

    def _v2(self) -> Optional[Tuple[ProxyInfo, bytes]]:
        buf = self._buf
        sig = len(V2_SIGNATURE)
        if not V2_SIGNATURE.startswith(bytes(buf[:sig])):
            raise ProxyHeaderError(_missing(bytes(buf[:16])))
        if len(buf) < V2_HEADER_SIZE:
            return None
        ver_cmd, fam, length = _V2_HEAD.unpack_from(buf, sig)
        if ver_cmd >> 4 != 2:
            raise ProxyHeaderError(f"PROXY protocol version {ver_cmd >> 4} is not supported (2 is)")
        command = ver_cmd & 0x0F
        if command > 1:
            raise ProxyHeaderError(f"unknown PROXY protocol v2 command {command}")
        total = V2_HEADER_SIZE + length
        if total > MAX_HEADER:
            raise ProxyHeaderError(
                f"a PROXY protocol v2 header of {total} bytes (the limit is {MAX_HEADER})"
            )
        if len(buf) < total:
            return None
        body, rest = bytes(buf[V2_HEADER_SIZE:total]), bytes(buf[total:])
        buf.clear()
        family, transport = fam >> 4, fam & 0x0F
        if family > 3 or transport > 2:
            raise ProxyHeaderError(f"unknown PROXY protocol v2 address family 0x{fam:02x}")
        sizes = {1: 12, 2: 36, 3: 216}
        used = sizes.get(family, 0) if command == 1 else 0
        if command == 1 and length < sizes.get(family, 0):
            raise ProxyHeaderError(
                f"a PROXY protocol v2 address block of {length} bytes is too short for its family"
            )
        _check_tlvs(body[used:] if command == 1 else b"")
        if command == 0 or transport != 1 or family not in (1, 2):  # LOCAL, UNSPEC, UNIX, DGRAM
            return ProxyInfo(2, None, None, local=command == 0), rest
        if family == 1:
            src = str(ipaddress.IPv4Address(body[0:4]))
            dst = str(ipaddress.IPv4Address(body[4:8]))
            sport, dport = struct.unpack_from(">HH", body, 8)
        else:
            src = str(ipaddress.IPv6Address(body[0:16]))
            dst = str(ipaddress.IPv6Address(body[16:32]))
            sport, dport = struct.unpack_from(">HH", body, 32)
        return ProxyInfo(2, (src, sport), (dst, dport)), rest


def _ip(text: str, family: int) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(
            f"'{printable(text)}' is not an IPv{family} address (PROXY protocol v1)"
        ) from None
    if ip.version != family:
        raise ProxyHeaderError(f"'{text}' is not an IPv{family} address (PROXY protocol v1)")
    return str(ip)


def _check_tlvs(data: bytes) -> None:
    """The TLVs after the addresses are skipped; their layout must hold."""
    at = 0
    while at < len(data):
        if len(data) - at < 3:
            raise ProxyHeaderError("a PROXY protocol v2 TLV is cut short")
        (size,) = struct.unpack_from(">H", data, at + 1)
        at += 3 + size
        if at > len(data):
            raise ProxyHeaderError("a PROXY protocol v2 TLV runs past the header")


def _missing(first: bytes) -> str:
    shown = printable(first.decode("latin-1"))
    return f"no PROXY protocol header from a trusted proxy (its first bytes: '{shown}')"
