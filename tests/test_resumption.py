"""Session tickets and resumed handshakes (docs/PROTOCOL.md §4.8): the
core on its own, the client's SessionStore, and both adapters over sockets."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa, x25519

import callcp
from callcp import ClientAuthError, SessionStore, fingerprint
from callcp._core.events import DecryptionRequested, HandshakeCompleted, MessageReceived
from callcp._core.protocol import ClientProtocol, ServerProtocol
from callcp._core.shares import sign_share
from callcp._core.tickets import Session, TicketKeys
from callcp._core.wire import FrameType
from tests.adapters import Adapter, Resumed
from tests.helpers import accept_any, feed

NOW = 1_800_000_000.0


def _handshake(
    key: rsa.RSAPrivateKey,
    tickets: Optional[TicketKeys],
    session: Optional[Session] = None,
    *,
    now: float = NOW,
    client_key: Optional[rsa.RSAPrivateKey] = None,
    authorize: Any = None,
) -> Tuple[ServerProtocol, ClientProtocol, List[Session]]:
    """One connection, in memory: (server, client, tickets the client got)."""
    got: List[Session] = []
    client = ClientProtocol(
        accept_any, session=session, on_ticket=got.append, clock=lambda: now,
        client_key=client_key,
    )  # fmt: skip
    share = sign_share(key, x25519.X25519PrivateKey.generate(), int(now) + 60, now)
    server = ServerProtocol(
        key, tickets=tickets, clock=lambda: now, authorize_client=authorize, share=share
    )
    server.start()
    feed(client, server.data_to_send())
    client.send(b"request")
    events = feed(server, client.data_to_send())
    assert events[-1] == MessageReceived(b"request")
    server.send(b"reply")
    assert feed(client, server.data_to_send()) == [
        HandshakeCompleted(4, fingerprint(key)),
        MessageReceived(b"reply"),
    ]
    return server, client, got


def test_a_ticket_spares_the_server_its_rsa_decryption(
    server_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    rsa_work: List[bytes] = []
    real = DecryptionRequested.run

    def counting(self: DecryptionRequested) -> Optional[bytes]:
        if self.premaster is None:  # an RSA private-key operation
            rsa_work.append(self.ciphertext)
        return real(self)

    monkeypatch.setattr(DecryptionRequested, "run", counting)
    keys = TicketKeys(3600)
    server, _, got = _handshake(server_key, keys)
    assert not server.resumed and len(got) == 1 and len(rsa_work) == 1
    assert got[0].server_fingerprint == fingerprint(server_key)
    assert got[0].expiry == NOW + 3600

    server, client, again = _handshake(server_key, keys, got[0])
    assert server.resumed and client.offered_ticket
    assert len(rsa_work) == 1  # no RSA private-key operation this time
    assert len(again) == 1 and again[0].ticket != got[0].ticket  # a fresh ticket each time


@pytest.mark.parametrize(
    "spoil",
    ["forged", "tampered", "expired", "another server's key", "previous epoch", "old epoch"],
)
def test_an_unusable_ticket_falls_back_to_a_full_handshake(
    server_key: rsa.RSAPrivateKey, spoil: str
) -> None:
    """A stale, forged or foreign ticket costs the server its RSA
    decryption, in the same connection, and nothing else: no error."""
    keys = TicketKeys(3600)
    _, _, got = _handshake(server_key, keys)
    session, now = got[0], NOW
    if spoil == "forged":
        session = Session(os.urandom(len(session.ticket)), session.secret,
                          session.server_fingerprint, session.expiry)  # fmt: skip
    elif spoil == "tampered":
        ticket = bytearray(session.ticket)
        ticket[-1] ^= 1
        session = Session(bytes(ticket), session.secret, session.server_fingerprint,
                          session.expiry)  # fmt: skip
    elif spoil == "expired":
        now = NOW + 3601
        session = Session(session.ticket, session.secret, session.server_fingerprint,
                          now + 10)  # (the client still believes in it)  # fmt: skip
    elif spoil == "another server's key":
        keys = TicketKeys(3600)  # a server with its own ticket key
    elif spoil == "previous epoch":  # still accepted: rotation keeps one epoch back
        now = NOW + 3600 * 0.99
    elif spoil == "old epoch":
        now = NOW + 2 * 3600
        session = Session(session.ticket, session.secret, session.server_fingerprint,
                          now + 10)  # fmt: skip
    server, client, again = _handshake(server_key, keys, session, now=now)
    assert client.offered_ticket
    assert server.resumed is (spoil == "previous epoch")
    assert len(again) == 1


def test_a_ticket_from_another_server_key_is_not_even_offered(
    server_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey
) -> None:
    keys = TicketKeys(3600)
    _, _, got = _handshake(server_key, keys)
    server, client, _ = _handshake(other_key, keys, got[0])
    assert not client.offered_ticket and not server.resumed


def test_servers_sharing_a_ticket_key_resume_each_others_sessions(
    server_key: rsa.RSAPrivateKey,
) -> None:
    master = os.urandom(32)
    _, _, got = _handshake(server_key, TicketKeys(600, master))
    server, _, _ = _handshake(server_key, TicketKeys(600, master), got[0])
    assert server.resumed


def test_a_ticket_is_bound_to_the_client_key_that_authenticated(
    server_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey, client_key: rsa.RSAPrivateKey
) -> None:
    keys = TicketKeys(3600)
    allowed = {fingerprint(client_key), fingerprint(other_key)}
    _, _, got = _handshake(
        server_key, keys, client_key=client_key, authorize=allowed.__contains__
    )
    server, _, _ = _handshake(
        server_key, keys, got[0], client_key=client_key, authorize=allowed.__contains__
    )
    assert server.resumed and server.peer_fingerprint == fingerprint(client_key)
    with pytest.raises(ClientAuthError, match="issued to another client key"):
        _handshake(server_key, keys, got[0], client_key=other_key,
                   authorize=allowed.__contains__)  # fmt: skip


def test_no_tickets_when_the_server_issues_none(server_key: rsa.RSAPrivateKey) -> None:
    server, client, got = _handshake(server_key, None)
    assert got == []
    del server, client


def test_new_ticket_is_a_client_only_record(server_key: rsa.RSAPrivateKey) -> None:
    from callcp._core.errors import RemoteProtocolError
    from tests.helpers import Pair

    p = Pair(server_key)
    p.handshake()
    p.client._owed.append((FrameType.NEW_TICKET, b"\x00\x00\x00\x01\x00\x01x"))
    with pytest.raises(RemoteProtocolError, match="unexpected NEW_TICKET"):
        p.to_server()


# ------------------------------------------------------------ SessionStore


def _session(server: str = "SHA256:x", expiry: float = 4e9) -> Session:
    return Session(os.urandom(143), os.urandom(32), server, expiry)


def test_session_store_tickets_are_single_use_and_bounded() -> None:
    store = SessionStore(per_server=2, max_servers=2)
    a, b, c = _session(), _session(), _session()
    for s in (a, b, c):
        store.put("Host", 1, "", s)
    assert len(store) == 2  # the newest two
    assert store.take("host", 1) is c and store.take("host", 1) is b
    assert store.take("host", 1) is None
    store.put("h", 1, "", _session(expiry=1.0))  # expired: never handed out
    assert store.take("h", 1) is None
    store.put("h1", 1, "id", a)
    assert store.take("h1", 1) is None and store.take("h1", 1, "id") is a
    for i in range(3):
        store.put(f"h{i}", 1, "", _session())
    assert store.take("h0", 1) is None  # least recently used server forgotten


def test_session_store_file_is_private_and_shared_between_processes(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "sessions.json"
    first = SessionStore(path)
    session = _session()
    first.put("h", 9, "", session)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = SessionStore(path)  # (another process)
    assert second.take("h", 9) == session
    assert first.take("h", 9) is None  # the file is the truth: taken once
    path.write_text("not json")
    assert SessionStore(path).take("h", 9) is None  # a damaged file costs a full handshake


def test_ticket_key_option(tmp_path: Path) -> None:
    from callcp._common import load_ticket_key
    from callcp._core.errors import KeyManagementError

    with pytest.raises(ValueError, match="ticket_key"):
        callcp.ServerOptions(ticket_key=b"short")
    with pytest.raises(ValueError, match="ticket_lifetime"):
        callcp.ServerOptions(ticket_lifetime=0.5)
    path = tmp_path / "ticket.key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o644)
    with pytest.raises(KeyManagementError, match="readable by every user"):
        load_ticket_key(path)
    path.chmod(0o640)  # (a group that may only read: as for the server key)
    assert load_ticket_key(path) == [path.read_bytes()]
    path.chmod(0o620)
    with pytest.raises(KeyManagementError, match="writable by its group"):
        load_ticket_key(path)
    path.chmod(0o600)
    assert load_ticket_key(str(path)) == [path.read_bytes()]
    path.write_bytes(bytes(8))
    with pytest.raises(KeyManagementError, match="at least 32"):
        load_ticket_key(path)


# ------------------------------------------------------------ over sockets


def test_the_second_connection_resumes(adapter: Adapter, tmp_path: Path) -> None:
    """Default clients keep the ticket the server gave them (this process's
    store) and resume the next connection; a store of None never does."""
    handler = Resumed()
    srv = adapter.serve(handler)
    store = SessionStore(tmp_path / "sessions.json")
    for _ in range(3):
        with srv.connect(session_store=store) as conn:
            assert conn.request(b"x") == b"x"
    with srv.connect(session_store=None) as conn:
        assert conn.request(b"y") == b"y"
    assert handler.resumed == [False, True, True, False]


def test_workers_resume_each_others_sessions(server_key: rsa.RSAPrivateKey) -> None:
    """With workers=N the parent gives every worker the same ticket key."""
    import threading

    def handler(conn: callcp.Connection) -> None:
        for _ in conn:
            conn.send(b"resumed" if conn.resumed else b"full")

    server = callcp.serve(handler, "127.0.0.1", 0, key=server_key, workers=2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        store = SessionStore()
        answers = []
        for _ in range(12):
            with callcp.connect(
                "127.0.0.1", server.port, server_fingerprint=server.fingerprint,
                session_store=store,
            ) as conn:  # fmt: skip
                answers.append(conn.request(b"?"))
        assert answers[0] == b"full" and set(answers[1:]) == {b"resumed"}
    finally:
        server.shutdown()
        thread.join(10)


def test_session_store_file_ignores_what_is_not_its_own(tmp_path: Path) -> None:
    """The file is written through a fresh temporary file and a rename (a
    planted symlink is replaced, never followed), and a file others may
    write, or that is not a regular file, reads as empty."""
    target = tmp_path / "victim"
    target.write_text("precious")
    path = tmp_path / "sessions.json"
    path.symlink_to(target)
    store = SessionStore(path)
    assert store.take("h", 1) is None  # (a symlink is not read)
    store.put("h", 1, "", _session())
    assert target.read_text() == "precious" and not path.is_symlink()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o666)
    assert SessionStore(path).take("h", 1) is None  # writable by others: not trusted
    path.unlink()
    os.mkfifo(path)
    assert SessionStore(path).take("h", 1) is None  # (no hang on a FIFO)
    path.unlink()
    path.write_text('{"h:1 ": [{"ticket": "00", "secret": "00", "server": "x", "expiry": 1e999}]}')
    path.chmod(0o600)
    assert SessionStore(path).take("h", 1) is None  # a damaged entry costs nothing more


def test_oversized_and_extra_tickets_are_not_kept(server_key: rsa.RSAPrivateKey) -> None:
    from callcp._core.tickets import MAX_TICKET_BYTES
    from callcp._core.wire import encode_new_ticket
    from tests.helpers import Pair

    got: List[Session] = []
    p = Pair(server_key, client_kwargs={"on_ticket": got.append})
    p.handshake()
    too_big = encode_new_ticket(60, b"x" * (MAX_TICKET_BYTES + 1))
    p.server._owed.append((FrameType.NEW_TICKET, too_big))
    p.server._owed.append((FrameType.NEW_TICKET, encode_new_ticket(60, b"a" * 100)))
    p.server._owed.append((FrameType.NEW_TICKET, encode_new_ticket(60, b"b" * 100)))
    p.to_client()
    assert [s.ticket for s in got] == [b"a" * 100]  # the first usable one, only
    assert SessionStore().put("h", 1, "", _session()) is None


def test_a_forked_child_does_not_reuse_the_parents_tickets() -> None:
    store = SessionStore()
    store.put("h", 1, "", _session())
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, b"1" if store.take("h", 1) is None else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert store.take("h", 1) is not None  # the parent keeps its own


# ------------------------------------------------ ticket key files and rotation


def test_ticket_key_files_of_hex_lines_and_rotation_in_memory(tmp_path: Path) -> None:
    """A file of hex lines: the first seals, every line opens; a ticket
    sealed under a key rotated out of first place still opens, one under a
    key dropped from the file no longer does."""
    from callcp._common import load_ticket_key, parse_ticket_keys
    from callcp._core.errors import KeyManagementError

    a, b, c = os.urandom(32), os.urandom(32), os.urandom(32)
    path = tmp_path / "tickets"
    path.write_text(f"# comment\n{b.hex()}  # current\n\n{a.hex()}\n")
    path.chmod(0o600)
    assert load_ticket_key(path) == [b, a]
    assert parse_ticket_keys(bytes(range(256))) is None  # (binary: one raw secret)
    for bad in (b"abc\n", a.hex()[:63].encode(), b"# only a comment\n", (a.hex() + "0").encode()):
        with pytest.raises(ValueError):  # (a text file must be whole keys)
            parse_ticket_keys(bad)
    path.write_text(f"{b.hex()}\n{a.hex()[:40]}\n")  # (a copy cut short)
    with pytest.raises(KeyManagementError, match="line 2 is not a key"):
        load_ticket_key(path)
    path.write_text("".join(os.urandom(32).hex() + "\n" for _ in range(9)))
    with pytest.raises(KeyManagementError, match="9 keys; at most 8"):
        load_ticket_key(path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)  # (opened without blocking, and refused)
    with pytest.raises(KeyManagementError, match="not a regular file"):
        load_ticket_key(fifo)
    path.write_text(f"# comment\n{b.hex()}  # current\n\n{a.hex()}\n")
    server_hash = bytes(32)
    old = TicketKeys(3600, a)
    ticket = old.seal(1000.0, 4, server_hash, None, b"s" * 32)
    rotated = TicketKeys(3600, b, previous=[a])
    assert rotated.open(ticket, 1001.0, server_hash) is not None
    new_ticket = rotated.seal(1001.0, 4, server_hash, None, b"t" * 32)
    assert old.open(new_ticket, 1002.0, server_hash) is None  # (a server not yet given b)
    assert TicketKeys(3600, c, previous=[b]).open(ticket, 1002.0, server_hash) is None


def test_keygen_ticket_key_and_rotate(tmp_path: Path) -> None:
    from callcp import cli
    from callcp._common import load_ticket_key

    path = tmp_path / "tickets"
    assert cli.main(["keygen", "--ticket-key", str(path), "-q"]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = load_ticket_key(path)
    assert first is not None and len(first) == 1 and len(first[0]) == 32
    assert cli.main(["keygen", "--ticket-key", str(path), "-q"]) == 7  # never overwritten
    for _ in range(4):
        assert cli.main(["keygen", "--ticket-key", str(path), "--rotate", "-q"]) == 0
    keys = load_ticket_key(path)
    assert keys is not None and len(keys) == 3 and first[0] not in keys
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    shared = tmp_path / "shared.keys"  # (a link to a shared file: the file is rotated)
    os.replace(path, shared)
    path.symlink_to(shared)
    assert cli.main(["keygen", "--ticket-key", str(path), "--rotate", "-q"]) == 0
    assert path.is_symlink() and load_ticket_key(shared) == load_ticket_key(path)
    assert load_ticket_key(shared) is not None and load_ticket_key(shared)[1:] == keys[:2]
    path.unlink()
    os.replace(shared, path)
    if os.geteuid() == 0:  # (a rotation by root keeps the file the service's)
        os.chown(path, 12345, 23456)
        path.chmod(0o640)
        assert cli.main(["keygen", "--ticket-key", str(path), "--rotate", "-q"]) == 0
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (12345, 23456, 0o640)


def test_two_servers_on_one_key_and_ticket_file_resume_each_other(
    server_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    """Behind one address (a proxy switching backends), a client resumes on
    the other server; after a rotation of the file, read again by both
    within a second, old tickets still open and new ones are sealed under
    the new key."""
    import logging
    import threading

    from tests.sock_proxy import FrameProxy
    from tests.sock_support import wait_until

    path = tmp_path / "tickets"
    path.write_text(os.urandom(32).hex() + "\n")
    path.chmod(0o600)
    handler = Resumed()
    logs: List[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logs.append(record.getMessage())

    logger = logging.getLogger(f"callcp.test.tickets.{os.getpid()}")
    logger.addHandler(Capture())
    logger.setLevel(logging.INFO)
    servers = [
        callcp.serve(
            handler.sync, "127.0.0.1", 0, key=callcp.KeyPair(server_key), ticket_key=path,
            logger=logger,
        )
        for _ in range(2)
    ]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    proxy = FrameProxy(("127.0.0.1", servers[0].port))
    store = SessionStore()
    try:

        def request(backend: int) -> None:
            proxy.target = ("127.0.0.1", servers[backend].port)
            with callcp.connect(
                *proxy.address, server_fingerprint=servers[0].fingerprint, session_store=store
            ) as conn:
                assert conn.request(b"x") == b"x"

        request(0)
        request(1)
        request(0)
        assert handler.resumed == [False, True, True]
        os.replace(path, tmp_path / "old")  # (a rotation: a new file, the old key second)
        rotated = tmp_path / "new"
        rotated.write_text(os.urandom(32).hex() + "\n" + (tmp_path / "old").read_text())
        rotated.chmod(0o600)
        os.replace(rotated, path)
        assert wait_until(lambda: sum("read again" in line for line in logs) == 2, timeout=10)
        request(1)  # the ticket from before the rotation: opened by the previous key
        request(0)  # the one just sealed under the new key
        assert handler.resumed[-2:] == [True, True]
    finally:
        proxy.close()
        for s in servers:
            s.shutdown()


def test_a_key_removed_from_the_file_opens_nothing_more(
    server_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    """After the file is replaced without the old key (--force: a key that
    leaked), the very next connection's ticket, sealed under it, no longer
    opens: a full handshake (the server's ready-made next connection held
    the old keys: it is made again)."""
    import logging
    import threading

    from callcp import cli
    from tests.sock_support import wait_until

    path = tmp_path / "tickets"
    assert cli.main(["keygen", "--ticket-key", str(path), "-q"]) == 0
    handler = Resumed()
    logs: List[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logs.append(record.getMessage())

    logger = logging.getLogger(f"callcp.test.removed.{os.getpid()}")
    logger.addHandler(Capture())
    logger.setLevel(logging.INFO)
    server = callcp.serve(
        handler.sync, "127.0.0.1", 0, key=callcp.KeyPair(server_key), ticket_key=path, logger=logger
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    store = SessionStore()
    try:
        for _ in range(2):
            with callcp.connect(
                "127.0.0.1", server.port, server_fingerprint=server.fingerprint, session_store=store
            ) as conn:
                conn.request(b"x")
        assert handler.resumed == [False, True]
        assert cli.main(["keygen", "--ticket-key", str(path), "--force", "-q"]) == 0
        assert wait_until(lambda: any("read again" in line for line in logs), timeout=10)
        with callcp.connect(
            "127.0.0.1", server.port, server_fingerprint=server.fingerprint, session_store=store
        ) as conn:
            conn.request(b"x")
        assert handler.resumed[-1] is False
    finally:
        server.shutdown()


def test_rotations_at_once_lose_no_key(tmp_path: Path) -> None:
    """Two `keygen --rotate` at the same time: one waits for the other (a
    lock beside the file), so both new keys are kept."""
    import subprocess
    import sys

    from callcp._common import load_ticket_key

    path = tmp_path / "tickets"
    rotate = [sys.executable, "-m", "callcp", "keygen", "--ticket-key", str(path), "--rotate", "-q"]
    for _ in range(5):
        path.unlink(missing_ok=True)
        assert subprocess.run(rotate[:-2] + ["-q"], check=False).returncode == 0
        first = load_ticket_key(path)
        runs = [subprocess.Popen(rotate) for _ in range(2)]
        assert [run.wait(60) for run in runs] == [0, 0]
        keys = load_ticket_key(path)
        assert keys is not None and first is not None
        assert len(keys) == 3 and keys[2] == first[0]
