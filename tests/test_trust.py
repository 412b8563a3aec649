"""Server key policies (pin, known hosts with TOFU, insecure) and authorized client keys."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from callcp._core.errors import (
    KeyManagementError,
    ServerKeyChanged,
    ServerKeyError,
    ServerKeyRevoked,
    UnknownServerKey,
)
from callcp._core.keys import fingerprint
from callcp.trust import (
    DEFAULT_KNOWN_HOSTS,
    AuthorizedKeys,
    KnownHosts,
    KnownHostsEntry,
    MalformedLine,
    ServerKeyPolicy,
    format_address,
    normalize_fingerprint,
)


def _fp(seed: str) -> str:
    digest = hashlib.sha256(seed.encode()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


FP_A = _fp("a")
FP_B = _fp("b")
FP_C = _fp("c")


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    # RSA generation is slow: one 2048-bit key for the whole module.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- fingerprints and addresses ----------------------------------------------------


def test_normalize_fingerprint_forms() -> None:
    digest = hashlib.sha256(b"a").digest()
    b64 = base64.b64encode(digest).decode()
    assert b64.endswith("=")
    assert normalize_fingerprint(FP_A) == FP_A
    assert normalize_fingerprint("SHA256:" + b64) == FP_A  # padded
    assert normalize_fingerprint(b64.rstrip("=")) == FP_A  # no prefix
    assert normalize_fingerprint("sha256:" + b64) == FP_A
    assert normalize_fingerprint("  " + FP_A + "\n") == FP_A
    assert normalize_fingerprint(digest.hex()) == FP_A
    assert normalize_fingerprint("SHA256:" + digest.hex().upper()) == FP_A
    assert normalize_fingerprint(":".join(f"{b:02x}" for b in digest)) == FP_A


@pytest.mark.parametrize(
    "bad",
    ["", "SHA256:", "SHA256:abc", "MD5:" + FP_A[7:], FP_A + "A", FP_A[:-1] + "!", "x" * 1000],
)
def test_normalize_fingerprint_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="SHA-256"):
        normalize_fingerprint(bad)


def test_format_address() -> None:
    assert format_address("Example.COM", 8436) == "example.com:8436"
    assert format_address("127.0.0.1", 1) == "127.0.0.1:1"
    assert format_address("::1", 8436) == "[::1]:8436"
    assert format_address("[::1]", 8436) == "[::1]:8436"
    assert format_address("0:0:0:0:0:0:0:1", 8436) == "[::1]:8436"
    assert format_address("FE80::1", 65535) == "[fe80::1]:65535"
    for host in ["", "a b", "#x", "a:b", "host\n"]:
        with pytest.raises(ValueError):
            format_address(host, 8436)
    for port in [0, 65536, -1]:
        with pytest.raises(ValueError):
            format_address("localhost", port)
    with pytest.raises(TypeError):
        format_address("localhost", True)


# -- KnownHosts ---------------------------------------------------------------------


def test_known_hosts_missing_file_is_empty(tmp_path: Path) -> None:
    kh = KnownHosts(tmp_path / "missing" / "known_hosts")
    assert kh.lookup("localhost", 8436) is None
    assert kh.entries() == []
    assert not (tmp_path / "missing").exists()


def test_known_hosts_add_lookup_creates_private_file(tmp_path: Path) -> None:
    path = tmp_path / "dotdir" / "known_hosts"
    kh = KnownHosts(path)
    kh.add("Server.example", 8436, FP_A)
    kh.add("::1", 8436, FP_B)
    kh.add("10.0.0.1", 9000, FP_C)
    assert kh.lookup("server.example", 8436) == FP_A
    assert kh.lookup("0:0::1", 8436) == FP_B
    assert kh.lookup("10.0.0.1", 9000) == FP_C
    assert kh.lookup("10.0.0.1", 9001) is None
    assert path.read_text().splitlines() == [
        f"server.example:8436 {FP_A}",
        f"[::1]:8436 {FP_B}",
        f"10.0.0.1:9000 {FP_C}",
    ]
    if os.name == "posix":
        assert _mode(path) == 0o600
        assert _mode(path.parent) == 0o700


def test_known_hosts_add_same_is_noop_and_different_replaces(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(f"# my servers\nalpha:1 {FP_A}\n\nbeta:2 {FP_B}   # the beta box\n")
    kh = KnownHosts(path)
    before = path.read_text()
    kh.add("alpha", 1, FP_A)
    assert path.read_text() == before
    kh.add("alpha", 1, FP_C)
    assert kh.lookup("alpha", 1) == FP_C
    text = path.read_text()
    assert FP_A not in text
    assert "# my servers" in text and "# the beta box" in text
    assert kh.lookup("beta", 2) == FP_B
    assert [p.name for p in tmp_path.iterdir()] == ["known_hosts"]


def test_known_hosts_append_to_file_without_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(f"alpha:1 {FP_A}")
    kh = KnownHosts(path)
    kh.add("beta", 2, FP_B)
    assert kh.lookup("alpha", 1) == FP_A
    assert kh.lookup("beta", 2) == FP_B


def test_known_hosts_remove(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(f"alpha:1 {FP_A}\nbeta:2 {FP_B}\nalpha:1 {FP_C}\nalpha:1 garbage\n")
    kh = KnownHosts(path)
    gone = kh.remove("alpha", 1)
    assert [item.lineno for item in gone] == [1, 3, 4]  # (what it removed, malformed too)
    assert kh.lookup("alpha", 1) is None
    assert path.read_text() == f"beta:2 {FP_B}\n"
    assert kh.remove("alpha", 1) == []
    assert KnownHosts(tmp_path / "nope").remove("alpha", 1) == []


# The six spellings of 127.0.0.1 that the system's resolver takes; a key
# recorded under any of them is the key of all of them (one entry).
LOOPBACK_SPELLINGS = [
    "127.0.0.1", "127.1", "0x7f.0.0.1", "2130706433", "127.000.000.001", "::ffff:127.0.0.1",
]  # fmt: skip


@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS)
def test_every_spelling_of_an_ip_address_is_one_entry(tmp_path: Path, spelling: str) -> None:
    import socket

    if ":" not in spelling:  # (the resolver agrees: they all reach 127.0.0.1)
        assert socket.getaddrinfo(spelling, 1, socket.AF_INET)[0][4][0] == "127.0.0.1"
    kh = KnownHosts(tmp_path / "known_hosts")
    kh.add(spelling, 8436, FP_A)
    assert (tmp_path / "known_hosts").read_text() == f"127.0.0.1:8436 {FP_A}\n"
    for other in LOOPBACK_SPELLINGS:
        assert kh.lookup(other, 8436) == FP_A, other
        assert kh.lookup(f"[{other}]" if ":" in other else other, 8436) == FP_A
    policy = ServerKeyPolicy.known_hosts(kh.path, trust_on_first_use=True)
    with pytest.raises(ServerKeyChanged):  # (no spelling is a new host to trust)
        policy.verify("127.1" if spelling != "127.1" else "2130706433", 8436, FP_B)


def test_remove_matches_in_canonical_form_and_names_stay_names(tmp_path: Path) -> None:
    """``remove 127.1`` removes what was recorded for 127.0.0.1 (any
    spelling), on every port without one; ``localhost`` is a host name: its
    lines are its own, not 127.0.0.1's."""
    path = tmp_path / "known_hosts"
    kh = KnownHosts(path)
    kh.add("127.0.0.1", 8436, FP_A)
    kh.add("0x7f.1", 9000, FP_B)
    kh.add("LocalHost", 8436, FP_C)
    kh.revoke(FP_C, "127.0.0.1", 8436)
    assert [e.address for e in kh.entries()] == [
        "127.0.0.1:8436", "127.0.0.1:9000", "localhost:8436", "127.0.0.1:8436",
    ]  # fmt: skip
    gone = kh.remove("127.1", 8436)
    assert [(e.address, e.revoked) for e in gone] == [  # type: ignore[union-attr]
        ("127.0.0.1:8436", False), ("127.0.0.1:8436", True),
    ]  # fmt: skip
    assert kh.lookup("localhost", 8436) == FP_C and kh.lookup("127.0.0.1", 9000) == FP_B
    gone = kh.remove("localhost")
    assert [e.address for e in gone] == ["localhost:8436"]
    assert [e.address for e in kh.remove("2130706433")] == ["127.0.0.1:9000"]
    assert kh.entries() == []


def test_revoke_marks_a_key_for_every_server_once(tmp_path: Path) -> None:
    kh = KnownHosts(tmp_path / "known_hosts")
    kh.add("alpha", 1, FP_A)
    assert kh.revoke(FP_A) is True
    assert kh.revoke(FP_A) is False  # (already marked)
    assert (tmp_path / "known_hosts").read_text().splitlines()[-1] == f"@revoked * {FP_A}"
    policy = ServerKeyPolicy.known_hosts(kh.path)
    with pytest.raises(ServerKeyRevoked):
        policy.verify("alpha", 1, FP_A)
    with pytest.raises(ValueError, match="needs its port"):
        kh.revoke(FP_B, "alpha")


def test_known_hosts_tolerates_comments_and_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_bytes(
        (
            "# comment\n"
            "\n"
            "   \n"
            f"good:8436 {FP_A}\n"
            "justonefield\n"
            "nohostport SHA256:xyz\n"
            f"::1:8436 {FP_B}\n"
            "bad:port:99999999 x\n"
            "other:1 SHA256:notbase64!!\n"
            f"[::1]:8436 {FP_C} trailing comment\n"
        ).encode()
        + b"\xff\xfe binary junk\n"
    )
    kh = KnownHosts(path)
    assert kh.lookup("good", 8436) == FP_A
    assert kh.lookup("::1", 8436) == FP_C
    items = kh.entries()
    good = [i for i in items if isinstance(i, KnownHostsEntry)]
    bad = [i for i in items if isinstance(i, MalformedLine)]
    assert [(e.host, e.port, e.lineno) for e in good] == [("good", 8436, 4), ("::1", 8436, 10)]
    assert good[1].address == "[::1]:8436"
    assert [m.lineno for m in bad] == [5, 6, 7, 8, 9, 11]
    assert next(m for m in bad if m.lineno == 9).address == "other:1"
    # Adding keeps the junk lines intact.
    kh.add("new", 1, FP_B)
    assert path.read_bytes().count(b"\xff\xfe binary junk") == 1


def test_known_hosts_default_path_expands_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))
    assert Path("~/.callcp/known_hosts") == DEFAULT_KNOWN_HOSTS
    kh = KnownHosts()
    assert kh.path == tmp_path / ".callcp" / "known_hosts"
    policy = ServerKeyPolicy.known_hosts()
    assert policy.verify("localhost", 8436, FP_A) == "new"
    assert (tmp_path / ".callcp" / "known_hosts").read_text() == f"localhost:8436 {FP_A}\n"


def test_known_hosts_unreadable_raises(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.mkdir()
    with pytest.raises(KeyManagementError) as info:
        KnownHosts(path).lookup("localhost", 1)
    assert str(path) in str(info.value)
    with pytest.raises(KeyManagementError):
        ServerKeyPolicy.known_hosts(path).verify("localhost", 1, FP_A)


# -- ServerKeyPolicy.known_hosts ------------------------------------------------------


def test_tofu_adds_then_accepts(tmp_path: Path) -> None:
    path = tmp_path / "callcp" / "known_hosts"
    policy = ServerKeyPolicy.known_hosts(path)
    assert policy.trust_on_first_use
    assert policy.warning is None
    assert policy.verify("server", 8436, FP_A) == "new"
    assert KnownHosts(path).lookup("server", 8436) == FP_A
    assert policy.verify("server", 8436, FP_A) == "known"
    assert policy.verify("SERVER", 8436, FP_A) == "known"
    # Another port is another server.
    assert policy.verify("server", 8437, FP_B) == "new"
    if os.name == "posix":
        assert _mode(path) == 0o600
        assert _mode(path.parent) == 0o700


def test_changed_key_is_refused_loudly(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(f"# servers\nother:1 {FP_C}\nserver:8436 {FP_A}\n")
    before = path.read_text()
    policy = ServerKeyPolicy.known_hosts(path)
    with pytest.raises(ServerKeyChanged) as info:
        policy.verify("server", 8436, FP_B)
    exc = info.value
    assert exc.expected == FP_A
    assert exc.presented == FP_B
    message = str(exc)
    assert FP_A in message and FP_B in message
    assert "server:8436" in message
    assert f"{path}:3" in message
    assert "remove line 3" in message
    assert "IDENTIFICATION HAS CHANGED" in message
    # Nothing was recorded or replaced.
    assert path.read_text() == before


def test_changed_key_ipv6(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    policy = ServerKeyPolicy.known_hosts(path)
    assert policy.verify("::1", 8436, FP_A) == "new"
    assert path.read_text() == f"[::1]:8436 {FP_A}\n"
    assert policy.verify("[::1]", 8436, FP_A) == "known"
    with pytest.raises(ServerKeyChanged, match=r"\[::1\]:8436"):
        policy.verify("::1", 8436, FP_B)


def test_unknown_without_tofu(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "known_hosts"
    policy = ServerKeyPolicy.known_hosts(path, trust_on_first_use=False)
    with pytest.raises(UnknownServerKey) as info:
        policy.verify("server", 8436, FP_A)
    message = str(info.value)
    assert "server:8436" in message and FP_A in message and str(path) in message
    assert not path.exists()
    KnownHosts(path).add("server", 8436, FP_A)
    assert policy.verify("server", 8436, FP_A) == "known"
    with pytest.raises(ServerKeyChanged):
        policy.verify("server", 8436, FP_B)


def test_several_entries_for_one_host(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(f"server:1 {FP_A}\nserver:1 {FP_B}\n")
    policy = ServerKeyPolicy.known_hosts(path)
    assert policy.verify("server", 1, FP_A) == "known"
    # a key recorded after another (an announced next key) is accepted too;
    # "rotated": once it proves itself the client forgets the earlier ones
    assert policy.verify("server", 1, FP_B) == "rotated"
    with pytest.raises(ServerKeyChanged, match="lines 1, 2"):
        policy.verify("server", 1, FP_C)
    kh = KnownHosts(path)
    assert kh.forget_older("server", 1, FP_B) == 1
    assert path.read_text() == f"server:1 {FP_B}\n"
    assert kh.add_also("server", 1, FP_C) and not kh.add_also("server", 1, FP_C)
    assert policy.verify("server", 1, FP_C) == "rotated"
    assert kh.forget_older("server", 1, FP_A) == 0  # (not recorded: nothing to go by)


def test_revoked_lines(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(
        f"server:1 {FP_A}\n@revoked server:1 {FP_B}\n@revoked * {FP_C}\n@cert-authority x y\n"
    )
    policy = ServerKeyPolicy.known_hosts(path)
    assert policy.verify("server", 1, FP_A) == "known"
    for fp in (FP_B, FP_C):
        with pytest.raises(ServerKeyRevoked, match="@revoked") as info:
            policy.verify("server", 1, fp)
        assert info.value.presented == fp
    with pytest.raises(ServerKeyRevoked):
        policy.verify("elsewhere", 2, FP_C)  # "*": every server
    assert KnownHosts(path).lookup("server", 1) == FP_A
    bad = [e for e in KnownHosts(path).entries() if not isinstance(e, KnownHostsEntry)]
    assert [b.reason for b in bad] == ["unknown marker @cert-authority"]


def test_malformed_entry_for_this_host_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(f"server:8436 SHA256:truncated\nother:1 {FP_A}\n")
    policy = ServerKeyPolicy.known_hosts(path)
    with pytest.raises(ServerKeyError, match="line 1") as info:
        policy.verify("server", 8436, FP_B)
    assert not isinstance(info.value, (ServerKeyChanged, UnknownServerKey))
    assert str(path) in str(info.value)
    # Malformed lines for other hosts do not matter.
    assert policy.verify("other", 1, FP_A) == "known"
    assert policy.verify("third", 1, FP_C) == "new"


def test_tofu_unwritable_file_still_accepts_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    policy = ServerKeyPolicy.known_hosts(blocker / "known_hosts")
    with caplog.at_level(logging.WARNING, logger="callcp.trust"):
        assert policy.verify("server", 8436, FP_A) == "unrecorded"
    assert any(
        "could not record" in r.getMessage() and "for this connection only" in r.getMessage()
        for r in caplog.records
    )


def test_tofu_race_between_threads_trusts_only_one_key(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    policy = ServerKeyPolicy.known_hosts(path)
    fps = [_fp(str(i)) for i in range(8)]
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(fps))

    def worker(fp: str) -> None:
        barrier.wait(timeout=10)
        try:
            results.append(policy.verify("server", 8436, fp))
        except ServerKeyChanged as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(fp,)) for fp in fps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == ["new"]
    assert len(errors) == len(fps) - 1
    assert len(path.read_text().splitlines()) == 1


# -- pinned and insecure -----------------------------------------------------------------


def test_pinned_match_and_mismatch() -> None:
    policy = ServerKeyPolicy.pinned(FP_A)
    assert policy.pin == FP_A
    assert policy.warning is None
    assert policy.verify("server", 8436, FP_A) == "pinned"
    with pytest.raises(ServerKeyChanged) as info:
        policy.verify("server", 8436, FP_B)
    assert info.value.expected == FP_A
    assert info.value.presented == FP_B
    assert FP_A in str(info.value) and FP_B in str(info.value)
    assert "server:8436" in str(info.value)


def test_pinned_accepts_other_forms() -> None:
    digest = hashlib.sha256(b"a").digest()
    for pin in [FP_A[7:], "SHA256:" + base64.b64encode(digest).decode(), digest.hex()]:
        assert ServerKeyPolicy.pinned(pin).verify("h", 1, FP_A) == "pinned"


@pytest.mark.parametrize("bad", ["", "SHA256:", "SHA256:tooshort", "not a fingerprint"])
def test_pinned_malformed_pin_fails_at_construction(bad: str) -> None:
    with pytest.raises(ValueError, match="fingerprint"):
        ServerKeyPolicy.pinned(bad)


def test_pinned_with_real_key(rsa_key: rsa.RSAPrivateKey) -> None:
    fp = fingerprint(rsa_key)
    assert ServerKeyPolicy.pinned(fp).verify("127.0.0.1", 8436, fp) == "pinned"


def test_insecure() -> None:
    policy = ServerKeyPolicy.insecure()
    assert policy.mode == "insecure"
    assert policy.verify("anything", 1, FP_A) == "insecure"
    assert policy.verify("anything", 1, FP_B) == "insecure"
    assert policy.warning is not None
    assert "DISABLED" in policy.warning and "NOT authenticated" in policy.warning
    assert "insecure" in repr(policy)


# -- AuthorizedKeys ----------------------------------------------------------------------


def test_authorized_keys_from_fingerprints() -> None:
    keys = AuthorizedKeys.from_fingerprints([FP_A, FP_B, FP_A[7:]])
    assert len(keys) == 2
    assert FP_A in keys and FP_B in keys
    assert FP_C not in keys
    assert FP_A[7:] in keys  # any accepted form
    assert "garbage" not in keys
    assert 42 not in keys
    assert set(keys) == {FP_A, FP_B}
    assert keys.fingerprints == frozenset({FP_A, FP_B})
    assert len(AuthorizedKeys.from_fingerprints([])) == 0
    assert FP_A not in AuthorizedKeys.from_fingerprints([])
    with pytest.raises(ValueError):
        AuthorizedKeys.from_fingerprints([FP_A, "nope"])
    with pytest.raises(TypeError):
        AuthorizedKeys.from_fingerprints(FP_A)


def test_authorized_keys_load(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    pem = (
        rsa_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    path = tmp_path / "authorized_keys"
    path.write_text(
        "# clients allowed to connect\n"
        "\n"
        f"{FP_A} alice's laptop\n"
        f"   {FP_B}\n"
        "# bob's key, as PEM:\n"
        f"{pem}"
        "\n"
    )
    keys = AuthorizedKeys.load(path)
    assert len(keys) == 3
    assert FP_A in keys and FP_B in keys
    assert fingerprint(rsa_key) in keys
    assert FP_C not in keys
    assert keys.path == path
    assert str(path) in repr(keys)


def test_authorized_keys_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "authorized_keys"
    path.write_text("# nobody yet\n")
    keys = AuthorizedKeys.load(path)
    assert len(keys) == 0
    assert FP_A not in keys


def test_authorized_keys_missing_or_unreadable(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(KeyManagementError) as info:
        AuthorizedKeys.load(missing)
    assert str(missing) in str(info.value)
    directory = tmp_path / "dir"
    directory.mkdir()
    with pytest.raises(KeyManagementError) as info:
        AuthorizedKeys.load(directory)
    assert str(directory) in str(info.value)


@pytest.mark.parametrize(
    ("contents", "lineno"),
    [
        (f"{FP_A}\nnot-a-fingerprint\n", 2),
        ("# c\n-----BEGIN PUBLIC KEY-----\nMIIB\n", 2),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", 1),
    ],
)
def test_authorized_keys_bad_line(tmp_path: Path, contents: str, lineno: int) -> None:
    path = tmp_path / "authorized_keys"
    path.write_text(contents)
    with pytest.raises(KeyManagementError) as info:
        AuthorizedKeys.load(path)
    assert str(path) in str(info.value)
    assert f"line {lineno}" in str(info.value)


def test_authorized_keys_refuses_non_rsa_pem(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "authorized_keys"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyManagementError, match="EC key") as info:
        AuthorizedKeys.load(path)
    assert str(path) in str(info.value)


def test_authorized_keys_follow_their_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A list loaded from a file follows it (looked at once a CHECK_EVERY);
    a file that stops parsing leaves the old list, logged; reload() now."""
    monkeypatch.setattr(AuthorizedKeys, "CHECK_EVERY", 0.0)
    path = tmp_path / "authorized"
    path.write_text(f"{FP_A} alice\n")
    keys = AuthorizedKeys.load(path)
    assert FP_A in keys and FP_B not in keys
    path.write_text(f"# alice left\n{FP_B} bob\n")
    assert FP_B in keys and FP_A not in keys
    path.write_text("not a fingerprint\n")
    with caplog.at_level(logging.ERROR, logger="callcp.trust"):
        assert FP_B in keys  # (the old list stays)
    assert "not reloaded" in caplog.text
    path.write_text(f"{FP_C}\n")
    assert keys.reload() is True and keys.fingerprints == {FP_C}
    assert keys.reload() is False
    with pytest.raises(ValueError):
        AuthorizedKeys.from_fingerprints([FP_A]).reload()


@pytest.mark.parametrize(
    "host",
    ["::1%x\nbank.example:8436 " + "bb" * 32 + "\n#", "::1%a b", "::1%\x1b]0;pwned\x07", "::1%"],
)
def test_an_ipv6_zone_cannot_smuggle_a_line(tmp_path: Path, host: str) -> None:
    """A scoped IPv6 address's zone is checked like a host name: no line
    break, space or control character can reach the file (found in review)."""
    kh = KnownHosts(tmp_path / "known_hosts")
    with pytest.raises(ValueError):
        kh.add(host, 9, FP_A)
    policy = ServerKeyPolicy.known_hosts(kh.path)
    with pytest.raises(ValueError):
        policy.verify(host, 9, FP_A)
    assert not kh.path.exists()
    kh.add("fe80::1%eth0", 9, FP_A)  # (a real zone is fine)
    assert kh.lookup("[FE80::1%eth0]", 9) == FP_A


@pytest.mark.parametrize("spelling", ["１２７.0.0.1", "127.0.0.1\u200b", "ＬＯＣＡＬＨＯＳＴ."])
def test_unicode_spellings_fold_as_the_resolver_folds_them(tmp_path: Path, spelling: str) -> None:
    """Fullwidth digits, zero-width characters, a trailing dot: the resolver
    reaches the same host, so they are the same entry (found in review)."""
    kh = KnownHosts(tmp_path / "known_hosts")
    kh.add("127.0.0.1", 9, FP_A)
    kh.add("localhost", 9, FP_B)
    expected = FP_B if "Ｌ" in spelling else FP_A
    assert kh.lookup(spelling, 9) == expected
    policy = ServerKeyPolicy.known_hosts(kh.path, trust_on_first_use=True)
    with pytest.raises(ServerKeyChanged):
        policy.verify(spelling, 9, FP_C)


def test_a_fifo_in_place_of_a_list_file_is_refused_not_waited_for(tmp_path: Path) -> None:
    fifo = tmp_path / "authorized"
    os.mkfifo(fifo)
    with pytest.raises(KeyManagementError, match="not a regular file"):
        AuthorizedKeys.load(fifo)
