"""The PROXY protocol header reader (callcp._core.proxy), in memory: both
versions as HAProxy sends them, every kind of malformed header, and a fuzz
test (any bytes, any split: a header, NEED_DATA, or ProxyHeaderError; never
another exception, never more than MAX_HEADER bytes held)."""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import struct
import time
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callcp import CallcpError
from callcp._core.proxy import (
    MAX_HEADER,
    V2_SIGNATURE,
    ProxyHeaderError,
    ProxyHeaderReader,
    ProxyInfo,
    looks_like_proxy_header,
)
from tests.adapters import Adapter, Echo
from tests.proxy_relay import HeaderFn, HeaderRelay
from tests.proxy_relay import v1 as v1_header
from tests.proxy_relay import v2 as v2_header
from tests.sock_support import wait_until

HELLO = b"\x02\x00\x00\x00\x10client hello..."


def v2(
    command: int = 1,
    family: int = 0x11,
    src: str = "203.0.113.7",
    dst: str = "10.0.0.1",
    sport: int = 51234,
    dport: int = 8436,
    tlvs: bytes = b"",
    version: int = 2,
) -> bytes:
    if family >> 4 == 1:
        addresses = (
            ipaddress.IPv4Address(src).packed
            + ipaddress.IPv4Address(dst).packed
            + struct.pack(">HH", sport, dport)
        )
    elif family >> 4 == 2:
        addresses = (
            ipaddress.IPv6Address(src).packed
            + ipaddress.IPv6Address(dst).packed
            + struct.pack(">HH", sport, dport)
        )
    elif family >> 4 == 3:
        addresses = b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0")
    else:
        addresses = b""
    if command == 0:
        addresses = b""
    body = addresses + tlvs
    return V2_SIGNATURE + struct.pack(">BBH", version << 4 | command, family, len(body)) + body


def read_all(data: bytes, step: Optional[int] = None) -> Tuple[ProxyInfo, bytes]:
    reader = ProxyHeaderReader()
    chunks = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        got = reader.feed(chunk)
        if got is not None:
            return got
    raise AssertionError("no header")


@pytest.mark.parametrize("step", [None, 1, 7])
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 8436\r\n",
            ProxyInfo(1, ("203.0.113.7", 51234), ("10.0.0.1", 8436)),
        ),
        (
            b"PROXY TCP6 2001:db8::7 2001:db8::1 0 65535\r\n",
            ProxyInfo(1, ("2001:db8::7", 0), ("2001:db8::1", 65535)),
        ),
        (b"PROXY UNKNOWN\r\n", ProxyInfo(1, None, None)),
        (b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n", ProxyInfo(1, None, None)),
        (v2(), ProxyInfo(2, ("203.0.113.7", 51234), ("10.0.0.1", 8436))),
        (
            v2(family=0x21, src="2001:db8::7", dst="::1"),
            ProxyInfo(2, ("2001:db8::7", 51234), ("::1", 8436)),
        ),
        (v2(command=0), ProxyInfo(2, None, None, local=True)),  # LOCAL: a health check
        (v2(family=0x00), ProxyInfo(2, None, None)),  # UNSPEC
        (v2(family=0x31), ProxyInfo(2, None, None)),  # UNIX
        (v2(family=0x12), ProxyInfo(2, None, None)),  # UDP: no TCP client to name
        (
            v2(tlvs=b"\x05\x00\x04abcd" + b"\x04\x00\x00"),  # unique id, NOOP
            ProxyInfo(2, ("203.0.113.7", 51234), ("10.0.0.1", 8436)),
        ),
    ],
)
def test_headers_as_proxies_send_them(
    header: bytes, expected: ProxyInfo, step: Optional[int]
) -> None:
    info, rest = read_all(header + HELLO, step)
    assert info == expected
    assert HELLO.startswith(rest)  # (what arrived with the header's end: the client's)
    reader = ProxyHeaderReader()
    got = reader.feed(header + HELLO)
    assert got == (expected, HELLO)  # (what follows is the client's, untouched)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (HELLO, "no PROXY protocol header from a trusted proxy"),
        (b"GET / HTTP/1.1\r\n", "no PROXY protocol header"),
        (b"PROXX TCP4", "no PROXY protocol header"),
        (b"\r\n\r\n\x00\r\nQUIX\n", "no PROXY protocol header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "malformed PROXY protocol v1 line"),
        (b"PROXY TCP4 " + b"1" * 120, "within 107 bytes"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "malformed PROXY protocol v1 line"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "malformed"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "over 65535"),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "not an IPv4 address"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "not an IPv4 address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "not an IPv6 address"),
        (
            b"PROXY TCP4 \x1b[2J 5.6.7.8 1 2\r\n",
            "malformed PROXY protocol v1 line ('PROXY TCP4 \\x1b[2J",
        ),
        (v2(version=1), "version 1 is not supported"),
        (v2(command=2), "unknown PROXY protocol v2 command 2"),
        (v2(family=0x41), "unknown PROXY protocol v2 address family 0x41"),
        (v2(family=0x13), "unknown PROXY protocol v2 address family 0x13"),
        (
            V2_SIGNATURE + struct.pack(">BBH", 0x21, 0x11, 8) + b"\0" * 8,
            "too short for its family",
        ),
        (v2(tlvs=b"\x05\x00"), "TLV is cut short"),
        (v2(tlvs=b"\x05\x00\x09abc"), "TLV runs past the header"),
        (
            V2_SIGNATURE + struct.pack(">BBH", 0x21, 0x11, MAX_HEADER),
            f"(the limit is {MAX_HEADER})",
        ),
    ],
)
def test_malformed_headers_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=re.escape(message)):
        read_all(data + b"\r\n" * 60)
    with pytest.raises(ProxyHeaderError):  # (however it is split)
        read_all(data + b"\r\n" * 60, 1)


def test_a_stranger_is_refused_at_its_first_byte_and_a_header_waits_for_its_end() -> None:
    with pytest.raises(ProxyHeaderError):
        ProxyHeaderReader().feed(b"\x02")
    reader = ProxyHeaderReader()
    for byte in b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r":
        assert reader.feed(bytes([byte])) is None
    assert reader.feed(b"\n") == (ProxyInfo(1, ("1.2.3.4", 1), ("5.6.7.8", 2)), b"")
    reader = ProxyHeaderReader()
    assert reader.feed(b"PROXY TCP4 1.2") is None
    with pytest.raises(ProxyHeaderError, match="closed the connection before a whole"):
        reader.feed(b"")


def test_looks_like_proxy_header() -> None:
    assert looks_like_proxy_header(b"PROXY TCP4 ...")
    assert looks_like_proxy_header(b"PRO")
    assert looks_like_proxy_header(V2_SIGNATURE[:5])
    assert not looks_like_proxy_header(HELLO)
    assert not looks_like_proxy_header(b"")


@settings(max_examples=400, deadline=None)
@given(
    prefix=st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY UNKNOWN", V2_SIGNATURE]),
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(min_value=1, max_value=64), max_size=20),
)
def test_fuzz_any_bytes_any_split(prefix: bytes, data: bytes, cuts: List[int]) -> None:
    blob = prefix + data
    reader = ProxyHeaderReader()
    pieces, at = [], 0
    for cut in cuts:
        pieces.append(blob[at : at + cut])
        at += cut
    pieces.append(blob[at:])
    fed = b""
    try:
        for piece in pieces:
            if not piece:
                continue
            fed += piece
            got = reader.feed(piece)
            assert reader.buffered <= MAX_HEADER + len(piece)
            if got is not None:
                info, rest = got
                assert fed.endswith(rest)
                assert info.version in (1, 2)
                if info.source is not None:
                    ipaddress.ip_address(info.source[0])
                    assert 0 <= info.source[1] <= 65535
                return
    except ProxyHeaderError as exc:
        assert "\x1b" not in str(exc) and "\r" not in str(exc)  # escaped for the log


@settings(max_examples=200, deadline=None)
@given(
    src=st.ip_addresses(v=4),
    dst=st.ip_addresses(v=4),
    sport=st.integers(0, 65535),
    dport=st.integers(0, 65535),
    tlvs=st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=5),
)
def test_fuzz_valid_v2_headers_round_trip(
    src: ipaddress.IPv4Address,
    dst: ipaddress.IPv4Address,
    sport: int,
    dport: int,
    tlvs: List[Tuple[int, bytes]],
) -> None:
    encoded = b"".join(bytes([kind]) + struct.pack(">H", len(v)) + v for kind, v in tlvs)
    header = v2(src=str(src), dst=str(dst), sport=sport, dport=dport, tlvs=encoded)
    info, rest = read_all(header + HELLO, 3)
    assert info == ProxyInfo(2, (str(src), sport), (str(dst), dport))
    assert HELLO.startswith(rest)


# ================================================ over sockets, both adapters

TRUSTED = {"proxy_protocol": True, "trusted_proxies": ["127.0.0.1"]}


@pytest.fixture
def relays() -> Iterator[Callable[..., HeaderRelay]]:
    made: List[HeaderRelay] = []

    def make(target: int, header: HeaderFn, **kw: str) -> HeaderRelay:
        relay = HeaderRelay(("127.0.0.1", target), header, **kw)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.close()


@pytest.mark.parametrize("version", [1, 2])
def test_the_client_a_trusted_proxy_names_is_the_connections_peer(
    adapter: Adapter, relays: Callable[..., HeaderRelay], version: int
) -> None:
    """remote_address, the logs and the handler see the client the header
    names, not the proxy."""
    server = adapter.serve(Echo(), **TRUSTED)
    make = relay_v1 if version == 1 else relay_v2
    relay = relays(server.port, make(("203.0.113.7", 40001)))
    with server_connect(adapter, server, relay.port) as conn:
        assert conn.request(b"hi") == b"hi"
    remote, _ = server.behaviour.addresses.get(timeout=10)
    assert remote[:2] == ("203.0.113.7", 40001)
    v6 = relays(server.port, make(("2001:db8::7", 40002)))
    with server_connect(adapter, server, v6.port) as conn:
        assert conn.request(b"hi") == b"hi"
    remote, _ = server.behaviour.addresses.get(timeout=10)
    assert remote[:2] == ("2001:db8::7", 40002)


def test_per_source_limits_count_the_named_client(
    adapter: Adapter, relays: Callable[..., HeaderRelay]
) -> None:
    """All connections come from the proxy's one address; the per-source
    limit counts each client the headers name."""
    server = adapter.serve(Echo(), max_connections_per_source=2, **TRUSTED)
    one = relays(server.port, relay_v2(("198.51.100.1", 1)))
    other = relays(server.port, relay_v2(("198.51.100.2", 1)))
    held = [server_connect(adapter, server, one.port) for _ in range(2)]
    for conn in held:
        assert conn.request(b"x") == b"x"
    refused(adapter, server, one.port)
    with server_connect(adapter, server, other.port) as conn:  # (another client: served)
        assert conn.request(b"y") == b"y"
    assert server.log is not None
    assert wait_until(lambda: server.log.about("refused 198.51.100.1:1: too many connections"))
    assert len(server.log.about("198.51.100.1", logging.WARNING)) == 1  # (logged once)
    for conn in held:
        conn.close()


def test_a_trusted_proxys_connection_without_a_header_is_refused(
    adapter: Adapter, relays: Callable[..., HeaderRelay]
) -> None:
    server = adapter.serve(Echo(), **TRUSTED)
    bare = relays(server.port, lambda client: None)
    refused(adapter, server, bare.port)
    assert server.log is not None
    assert wait_until(lambda: server.log.about("no PROXY protocol header from a trusted proxy"))
    assert server.behaviour.calls == 0


def test_a_header_from_an_untrusted_address_is_refused_and_direct_clients_are_served(
    adapter: Adapter, relays: Callable[..., HeaderRelay]
) -> None:
    server = adapter.serve(Echo(), **TRUSTED)
    forged = relays(server.port, relay_v1(("192.0.2.66", 666)), source="127.0.0.2")
    refused(adapter, server, forged.port)
    assert server.log is not None
    assert wait_until(
        lambda: server.log.about("a PROXY protocol header from an address that is not")
    )
    direct = relays(server.port, lambda client: None, source="127.0.0.2")
    with server_connect(adapter, server, direct.port) as conn:  # (no header: itself)
        assert conn.request(b"z") == b"z"
    remote, _ = server.behaviour.addresses.get(timeout=10)
    assert remote[0] == "127.0.0.2"


def test_health_checks_are_not_logged_and_a_slow_header_times_out(
    adapter: Adapter, relays: Callable[..., HeaderRelay]
) -> None:
    """The proxy's checks (v2 LOCAL, v1 UNKNOWN, or no header; read the
    ServerHello, close) are logged at DEBUG only; a header trickled a byte
    at a time is dropped at the handshake deadline, while a client is served."""
    server = adapter.serve(Echo(), handshake_timeout=1.0, **TRUSTED)
    checks = []
    for header in (relay_v2_local(), b"PROXY UNKNOWN\r\n", b""):  # (v2 LOCAL, v1, no header)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(header)
            assert b"CALLCP" in sock.recv(4096)
            checks.append(f"127.0.0.1:{sock.getsockname()[1]}")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
        started = time.monotonic()
        header = v1_header(("203.0.113.9", 9))
        closed = False
        for byte in header[:-1]:
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.1)
            if time.monotonic() - started > 3:
                break
        relay = relays(server.port, relay_v1(("203.0.113.10", 10)))
        with server_connect(adapter, server, relay.port) as conn:
            assert conn.request(b"ok") == b"ok"
        slow.settimeout(3)
        try:
            closed = closed or slow.recv(4096) is not None
        except OSError:
            closed = True
        assert closed
    assert server.log is not None
    assert wait_until(lambda: server.log.about("timed out"))
    assert not [line for line in server.log.messages(logging.INFO) for c in checks if c in line]
    assert len(server.log.about("health check")) == 3  # (at DEBUG)


def relay_v1(client: Tuple[str, int]) -> Callable[[Tuple[str, int]], bytes]:
    return lambda _: v1_header(client)


def relay_v2(client: Tuple[str, int]) -> Callable[[Tuple[str, int]], bytes]:
    return lambda _: v2_header(client)


def relay_v2_local() -> bytes:
    return v2_header(("0.0.0.0", 0), local=True)


def refused(adapter: Adapter, server: Any, port: int) -> None:
    """A connection through ``port`` is refused before its first message."""
    calls = server.behaviour.calls
    with pytest.raises(CallcpError):
        server_connect(adapter, server, port).request(b"x")
    assert server.behaviour.calls == calls


def server_connect(adapter: Adapter, server: Any, port: int) -> Any:
    return adapter.connect(port, server_fingerprint=server.fingerprint)


def test_worker_processes_read_the_header_too(
    relays: Callable[..., HeaderRelay], home: Any, tmp_path: Any
) -> None:
    """``callcp serve --workers 2 --proxy-protocol``: each worker process
    takes the trusted proxy's header, and logs the client it names.  (A
    server process of its own: worker processes forked from this test
    process would inherit whatever its other threads hold.)"""
    import callcp
    from tests.cli_support import CliServer

    log = tmp_path / "serve.log"
    server = CliServer(
        home,
        ["--port", "0", "--workers", "2", "-vv"]
        + ["--proxy-protocol", "--trusted-proxy", "127.0.0.1"],
        log,
    )
    try:
        clients = [(f"203.0.113.{i + 1}", 1000 + i) for i in range(6)]
        for client in clients:
            relay = relays(server.port, relay_v2(client))
            with callcp.connect(
                "127.0.0.1", relay.port, server_fingerprint=server.fingerprint, timeout=10
            ) as conn:
                assert conn.request(b"?") == b"?"
        for host, port in clients:
            assert wait_until(lambda h=host, p=port: f"connection from {h}:{p}" in server.log())
    finally:
        server.stop()


def test_a_port_probe_from_elsewhere_is_logged_at_info(adapter: Adapter) -> None:
    """A connection that closes without a byte (a TCP probe, a monitor, a
    Callcp 1.0 client) is noted at INFO, not WARNING."""
    server = adapter.serve(Echo())
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        assert b"CALLCP" in sock.recv(4096)
        probe = f"127.0.0.1:{sock.getsockname()[1]}"
    assert server.log is not None
    assert wait_until(lambda: server.log.about(f"connection from {probe} closed without a byte"))
    assert not [line for line in server.log.messages(logging.WARNING) if probe in line]


def test_a_header_naming_no_client_keeps_the_proxys_own_limits(
    adapter: Adapter, relays: Callable[..., HeaderRelay]
) -> None:
    """v2 LOCAL or v1 UNKNOWN names no client: the connection is the proxy's
    own, held to the per-source limits under the proxy's address (else such
    a header would lift them).  A refusal is logged once."""
    server = adapter.serve(Echo(), max_connections_per_source=2, **TRUSTED)
    local = relays(server.port, lambda _: relay_v2_local())
    unknown = relays(server.port, lambda _: b"PROXY UNKNOWN\r\n")
    held = [
        server_connect(adapter, server, local.port),
        server_connect(adapter, server, unknown.port),
    ]
    for conn in held:
        assert conn.request(b"x") == b"x"
    refused(adapter, server, local.port)
    assert server.log is not None
    assert wait_until(lambda: server.log.about("refused 127.0.0.1:"))
    assert len(server.log.about("too many connections", logging.WARNING)) == 1
    for conn in held:
        conn.close()


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["0.0.0.0/0"], "trusts every address"),
        (["::/0"], "trusts every address"),
        ([0], "not an IP address or network"),
        ([b"10.0.0.1"], "not an IP address or network"),
        ("10.0.0.1", "must be a list"),
        (["10.0.0.300"], "not an IP address or network"),
    ],
)
def test_trusted_proxies_are_checked(entries: Any, message: str) -> None:
    import callcp

    with pytest.raises(ValueError, match=message):
        callcp.ServerOptions(proxy_protocol=True, trusted_proxies=entries)


def test_an_ipv4_mapped_trusted_entry_matches_the_ipv4_peer() -> None:
    from callcp._engine import TrustedProxies

    trusted = TrustedProxies(["::ffff:10.0.0.5", "::ffff:192.0.2.0/120"])
    assert trusted.trusts(("10.0.0.5", 1))
    assert trusted.trusts(("::ffff:10.0.0.5", 1, 0, 0))
    assert trusted.trusts(("192.0.2.77", 1))
    assert not trusted.trusts(("10.0.0.6", 1))
