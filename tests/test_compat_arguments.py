"""The Callcp 1.0 API's bad arguments raise its own errors (issue 11, item 1).

A bad value (a port out of range or not an int, a host name that is not a
valid DNS/IDNA name, a malformed fingerprint, an option out of range) raises
a SecureTCPServerError / SecureTCPClientError subclass with a one-line
message, never a bare ValueError or UnicodeError; a wrong type raises
TypeError, as Python's own APIs do (see callcp.compat's docstring).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from callcp._core.errors import (
    KeyManagementError,
    LocalProtocolError,
    SecureTCPClientError,
    SecureTCPServerError,
    TransportError,
)
from callcp.compat import SecureTCPClient, SecureTCPServer
from callcp.keys import KeyPair
from tests.test_compat import WAIT, free_port, key_files, running_server

__all__ = ["key_files"]  # (a fixture, used by name)

GOOD_PIN = KeyPair.generate().fingerprint
LOG = logging.getLogger("test.compat.arguments")


def client(tmp_path: Path, **options: Any) -> SecureTCPClient:
    options.setdefault("host", "127.0.0.1")
    options.setdefault("port", free_port())
    options.setdefault("known_hosts", tmp_path / "known_hosts")
    options.setdefault("timeout", WAIT)
    return SecureTCPClient(use_display=False, logger=LOG, **options)


def started(key_files: tuple[Path, Path], **options: Any) -> SecureTCPServer:
    """A server whose start() is expected to fail at once."""
    options.setdefault("host", "127.0.0.1")
    options.setdefault("port", 0)
    server = SecureTCPServer(
        private_key_path=key_files[0],
        public_key_path=key_files[1],
        use_display=False,
        logger=LOG,
        **options,
    )
    server.initialize()
    return server


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "\r" not in text, text
    assert not isinstance(exc, (UnicodeError,)), repr(exc)
    return text


BAD_HOSTS = [
    pytest.param("a" * 64 + ".example", "label", id="label-over-63"),
    pytest.param("bad..host", "label", id="empty-label"),
    pytest.param("\ufffd.example", "Invalid character", id="idna-forbidden"),
    pytest.param("exa mple\n.com", "whitespace", id="line-break"),
    pytest.param("\x1b[2J.example", "control", id="escape"),
]

BAD_PORTS = [70000, -1, 65536, "abc", "8436", None, 8436.0, True]


@pytest.mark.parametrize(("host", "why"), BAD_HOSTS)
def test_client_bad_host_is_a_transport_error(tmp_path: Path, host: str, why: str) -> None:
    c = client(tmp_path, host=host)
    with pytest.raises(TransportError) as info:
        c.connect()
    text = one_line(info.value)
    assert text.startswith("Failed to connect: invalid host name ")
    assert why in text
    assert "\x1b" not in text
    assert not c.is_connected()


@pytest.mark.parametrize("port", BAD_PORTS)
def test_client_bad_port_is_a_transport_error(tmp_path: Path, port: Any) -> None:
    with pytest.raises(TransportError) as info:
        client(tmp_path, port=port).connect()
    text = one_line(info.value)
    assert text == f"Failed to connect: invalid port {port!r}: an integer from 1 to 65535"
    assert isinstance(info.value, SecureTCPClientError)


@pytest.mark.parametrize(
    "pin",
    [
        pytest.param("SHA256:abc", id="short"),
        pytest.param("garbage", id="garbage"),
        pytest.param("", id="empty"),
        pytest.param([GOOD_PIN, "SHA256:x"], id="one-of-two"),
        pytest.param([], id="none-given"),
    ],
)
def test_client_malformed_fingerprint_is_a_key_management_error(tmp_path: Path, pin: Any) -> None:
    with pytest.raises(KeyManagementError) as info:
        client(tmp_path, server_fingerprint=pin).connect()
    assert one_line(info.value).startswith("Failed to connect: invalid server_fingerprint: ")


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"timeout": -1}, "timeout"),
        ({"timeout": "soon"}, "timeout"),
        ({"max_message_size": -5}, "max_message_size"),
        ({"insecure": True, "server_fingerprint": GOOD_PIN}, "contradicts"),
    ],
)
def test_client_bad_option_is_a_local_protocol_error(
    tmp_path: Path, options: dict[str, Any], needle: str
) -> None:
    with pytest.raises(LocalProtocolError) as info:
        client(tmp_path, **options).connect()
    text = one_line(info.value)
    assert text.startswith("Failed to connect: invalid option: ") and needle in text
    assert isinstance(info.value, SecureTCPClientError)


def test_client_argument_errors_are_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger=LOG.name), pytest.raises(TransportError):
        client(tmp_path, port=70000).connect()
    assert [r.getMessage() for r in caplog.records if r.name == LOG.name] == [
        "Failed to connect: invalid port 70000: an integer from 1 to 65535"
    ]


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"host": None}, "host must be a str"),
        ({"host": 127}, "host must be a str"),
        ({"known_hosts": 123}, "known_hosts must be"),
        ({"client_key": 123}, "client_key must be"),
        ({"server_fingerprint": 123}, "server_fingerprint must be"),
        ({"server_fingerprint": [GOOD_PIN, 7]}, "server_fingerprint must be"),
    ],
)
def test_client_wrong_types_are_type_errors(
    tmp_path: Path, options: dict[str, Any], needle: str
) -> None:
    with pytest.raises(TypeError, match=needle):
        client(tmp_path, **options).connect()


def test_client_wrong_logger_type() -> None:
    with pytest.raises(TypeError, match="logger must be"):
        SecureTCPClient(logger="callcp", use_display=False)  # type: ignore[arg-type]


@pytest.mark.parametrize(("host", "why"), BAD_HOSTS)
def test_server_bad_host_is_a_transport_error(
    key_files: tuple[Path, Path], host: str, why: str
) -> None:
    server = started(key_files, host=host)
    with pytest.raises(TransportError) as info:
        server.start()
    text = one_line(info.value)
    assert text.startswith("invalid host name ") and why in text
    assert not server.running


@pytest.mark.parametrize("port", [p for p in BAD_PORTS if p != 8436.0] + [8436.5])
def test_server_bad_port_is_a_transport_error(key_files: tuple[Path, Path], port: Any) -> None:
    with pytest.raises(TransportError) as info:
        started(key_files, port=port).start()
    assert one_line(info.value) == f"invalid port {port!r}: an integer from 0 to 65535"
    assert isinstance(info.value, SecureTCPServerError)


@pytest.mark.parametrize(
    ("options", "error", "needle"),
    [
        ({"authorized_keys": ["garbage"]}, KeyManagementError, "invalid authorized_keys"),
        ({"authorized_keys": [GOOD_PIN, ""]}, KeyManagementError, "invalid authorized_keys"),
        ({"max_connections": 0}, LocalProtocolError, "max_connections"),
        ({"idle_timeout": -1}, LocalProtocolError, "idle_timeout"),
        ({"handshake_timeout": None}, LocalProtocolError, "handshake_timeout"),
        ({"backlog": "many"}, LocalProtocolError, "backlog"),
    ],
)
def test_server_bad_options_raise_callcp1_errors(
    key_files: tuple[Path, Path], options: dict[str, Any], error: type, needle: str
) -> None:
    with pytest.raises(error) as info:
        started(key_files, **options).start()
    assert needle in one_line(info.value)
    assert isinstance(info.value, SecureTCPServerError)


def test_server_bad_key_bits_is_a_key_management_error(tmp_path: Path) -> None:
    server = SecureTCPServer(
        private_key_path=tmp_path / "k.pem", public_key_path=None, key_bits=1000, use_display=False
    )
    with pytest.raises(KeyManagementError, match="1000-bit"):
        server.initialize()


def test_server_wrong_types_are_type_errors(key_files: tuple[Path, Path]) -> None:
    with pytest.raises(TypeError, match="message_callback must be callable"):
        SecureTCPServer(message_callback=b"echo", use_display=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="logger must be"):
        SecureTCPServer(logger=print, use_display=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="private_key_path must be"):
        SecureTCPServer(private_key_path=None, use_display=False).initialize()  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="public_key_path must be"):
        SecureTCPServer(
            private_key_path=key_files[0],
            public_key_path=8436,  # type: ignore[arg-type]
            use_display=False,
        ).initialize()
    with pytest.raises(TypeError, match="host must be"):
        started(key_files, host=0).start()
    with pytest.raises(TypeError, match="authorized_keys must be"):
        started(key_files, authorized_keys=42).start()


def test_a_good_server_and_client_still_work(key_files: tuple[Path, Path], tmp_path: Path) -> None:
    """The checks accept what they should: a pin in another accepted form,
    a list of pins, a fingerprint list for authorized_keys, port 0."""
    with running_server(key_files, authorized_keys=None) as server:
        assert server.fingerprint is not None
        c = client(
            tmp_path,
            port=server.port,
            server_fingerprint=["sha256:" + server.fingerprint[7:], GOOD_PIN],
        )
        c.connect()
        assert c.send_message(b"ok") == b"ok"
        with pytest.raises(TypeError, match="message must be bytes"):
            c.send_message("text")  # type: ignore[arg-type]
        c.disconnect()
