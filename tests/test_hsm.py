"""Keys in a PKCS#11 token (callcp.hsm), against a real SoftHSM2 token.

The URI grammar, the token key as a ``cryptography`` private key (signatures
and decryptions in the token, nothing exported), its failures (a wrong PIN,
no PIN, a missing token, a PIN file others can read), threads, fork, a lost
session, and end to end: a server whose key is in the token, pinned by the
fingerprint ``callcp fingerprint pkcs11:...`` prints, and a client whose
authentication key is in the token, over both adapters and with workers.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, List

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

import callcp
from callcp import KeyManagementError, KeyPair
from callcp.hsm import Pkcs11Key, Pkcs11Uri, generate_key, oaep_decode
from callcp.keys import load_public_key
from tests.adapters import FLAVOURS, Adapter, Echo
from tests.cli_support import CliServer, Result, err, out
from tests.hsm_support import OTHER_LABEL, PIN, SoftHsm
from tests.sock_support import wait_until

OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


@pytest.fixture(scope="module")
def server_pair(softhsm: SoftHsm) -> KeyPair:
    return KeyPair.load(softhsm.uri("server"))


@pytest.fixture(scope="module")
def client_pair(softhsm: SoftHsm) -> KeyPair:
    return KeyPair.load(softhsm.uri("client"))


# ================================================================ the URI


def test_uri_attributes_and_round_trip() -> None:
    text = (
        "pkcs11:token=My%20Token;object=srv;id=%01%ff;type=private;slot-id=7;serial=ab12"
        "?module-path=/opt/hsm/lib.so&pin-source=file:/etc/callcp/pin"
    )
    uri = Pkcs11Uri.parse(text)
    assert uri.token == "My Token" and uri.object == "srv" and uri.id == b"\x01\xff"
    assert uri.slot_id == 7 and uri.serial == "ab12" and uri.type == "private"
    assert uri.module_path == "/opt/hsm/lib.so" and uri.pin_source == "file:/etc/callcp/pin"
    assert Pkcs11Uri.parse(str(uri)) == uri
    assert Pkcs11Uri.parse("PKCS11:object=a").object == "a"  # (the scheme is case-blind)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("pkcs11:object=a;object=b", "gives 'object' twice"),
        ("pkcs11:label=a", "does not support the PKCS#11 URI path attribute 'label'"),
        ("pkcs11:object=a?pin=1", "query attribute 'pin'"),
        ("pkcs11:object=a?pin-value=1234", "carries its PIN"),
        ("pkcs11:object=a;type=public", "needs the private key"),
        ("pkcs11:object=a?module-path=lib.so", "module-path must be absolute"),
        ("pkcs11:object=a?module-name=../x", "not a path"),
        ("pkcs11:slot-id=x1", "slot-id must be a number"),
        ("pkcs11:slot-id=%C2%B2", "slot-id must be a number"),
        ("pkcs11:slot-id=%D9%A3", "slot-id must be a number"),
        ("pkcs11:object=", "object is empty"),
        ("pkcs11:object=a;id=", "id is empty"),
        ("pkcs11:token=;object=a", "token is empty"),
        ("pkcs11:object=%ff%fe", "not UTF-8"),
        ("pkcs11:object=a%0ab", "control character"),
        ("pkcs11:object=a b", "space or control character"),
        ("pkcs11:object", "not name=value"),
        ("file:/etc/key.pem", "not a PKCS#11 URI"),
        ("pkcs11:" + "a" * 5000, "longer than"),
    ],
)
def test_bad_uris_are_refused_with_a_reason(text: str, says: str) -> None:
    with pytest.raises(KeyManagementError, match=None) as caught:
        Pkcs11Uri.parse(text)
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


# ================================================ OAEP padding (raw-RSA tokens)


def _raw_decrypt(key: rsa.RSAPrivateKey, ciphertext: bytes) -> bytes:
    numbers = key.private_numbers()
    k = (key.key_size + 7) // 8
    return pow(int.from_bytes(ciphertext, "big"), numbers.d, numbers.public_numbers.n).to_bytes(
        k, "big"
    )


def test_oaep_decode_agrees_with_cryptography(server_key: rsa.RSAPrivateKey) -> None:
    """Every length a 2048-bit key carries, and blocks with leading zeros."""
    k = (server_key.key_size + 7) // 8
    public = server_key.public_key()
    for size in (0, 1, 31, 32, 33, 100, k - 2 * 32 - 2):
        message = os.urandom(size)
        em = _raw_decrypt(server_key, public.encrypt(message, OAEP))
        assert oaep_decode(em, k) == message
        assert oaep_decode(em.lstrip(b"\0"), k) == message  # (a token that drops zeros)


def test_oaep_decode_refuses_every_kind_of_bad_block(server_key: rsa.RSAPrivateKey) -> None:
    """A flipped bit anywhere (the leading zero, the seed, the label hash,
    the zero padding, the separator) fails, as cryptography's does; random
    ciphertexts fail in both."""
    k = (server_key.key_size + 7) // 8
    em = bytearray(_raw_decrypt(server_key, server_key.public_key().encrypt(b"p" * 32, OAEP)))
    for position in (0, 1, 20, 33, 40, 64, 100, k - 34, k - 33):
        bad = bytearray(em)
        bad[position] ^= 0x04
        assert oaep_decode(bytes(bad), k) is None, position
    assert oaep_decode(b"\1" + bytes(em[1:]), k) is None
    assert oaep_decode(bytes(k + 1), k) is None
    rng = random.Random(7)
    for _ in range(50):
        ciphertext = rng.randbytes(k - 1).rjust(k, b"\0")
        with pytest.raises(ValueError):
            server_key.decrypt(ciphertext, OAEP)
        assert oaep_decode(_raw_decrypt(server_key, ciphertext), k) is None


def test_oaep_decode_other_hashes_and_labels(server_key: rsa.RSAPrivateKey) -> None:
    k = (server_key.key_size + 7) // 8
    for algorithm, name in ((hashes.SHA1(), "sha1"), (hashes.SHA512(), "sha512")):
        pad = padding.OAEP(mgf=padding.MGF1(algorithm), algorithm=algorithm, label=b"tag")
        em = _raw_decrypt(server_key, server_key.public_key().encrypt(b"m" * 20, pad))
        assert oaep_decode(em, k, name, b"tag") == b"m" * 20
        assert oaep_decode(em, k, name, b"other") is None


# ============================================================ the token key


def test_token_key_signs_and_decrypts_in_the_token(server_pair: KeyPair) -> None:
    key = server_pair.private_key
    assert isinstance(key, Pkcs11Key) and server_pair.in_token
    assert key.key_size == 2048 and server_pair.key_size == 2048
    public = key.public_key()
    message = b"callcp/2 share"
    public.verify(key.sign(message, PSS, hashes.SHA256()), message, PSS, hashes.SHA256())
    pss_max = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=padding.PSS.MAX_LENGTH)
    public.verify(key.sign(message, pss_max, hashes.SHA384()), message, pss_max, hashes.SHA384())
    public.verify(
        key.sign(message, padding.PKCS1v15(), hashes.SHA512()),
        message,
        padding.PKCS1v15(),
        hashes.SHA512(),
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(message)
    prehashed = key.sign(digest.finalize(), PSS, Prehashed(hashes.SHA256()))
    public.verify(prehashed, message, PSS, hashes.SHA256())
    premaster = os.urandom(32)
    assert key.decrypt(public.encrypt(premaster, OAEP), OAEP) == premaster
    # SoftHSM2 2.6 does OAEP with SHA-1 only: the raw-RSA path is the one used.
    assert key.oaep_in_token is False


def test_a_bad_ciphertext_is_a_value_error_like_cryptographys(server_pair: KeyPair) -> None:
    key = server_pair.private_key
    for ciphertext in (os.urandom(256), b"\xff" * 256, b"short", b""):
        with pytest.raises(ValueError, match="Decryption failed"):
            key.decrypt(ciphertext, OAEP)


def test_the_private_key_cannot_leave_the_token(server_pair: KeyPair, tmp_path: Path) -> None:
    key = server_pair.private_key
    for attempt in (
        key.private_numbers,
        server_pair.private_pem,
        lambda: server_pair.save(tmp_path / "stolen.pem"),
        lambda: key.private_bytes(None, None, None),  # type: ignore[arg-type]
    ):
        with pytest.raises(KeyManagementError, match="cannot leave it"):
            attempt()
    assert not (tmp_path / "stolen.pem").exists()
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(key)
    assert PIN not in repr(key) and PIN not in repr(server_pair)


def test_unsupported_paddings_are_refused(server_pair: KeyPair) -> None:
    key = server_pair.private_key
    with pytest.raises(callcp_unsupported()):
        key.decrypt(b"x" * 256, padding.PKCS1v15())
    with pytest.raises(callcp_unsupported()):
        key.sign(b"x", PSS, hashes.MD5())
    mismatched = padding.PSS(mgf=padding.MGF1(hashes.SHA1()), salt_length=32)
    with pytest.raises(callcp_unsupported()):
        key.sign(b"x", mismatched, hashes.SHA256())


def callcp_unsupported() -> type:
    from cryptography.exceptions import UnsupportedAlgorithm

    return UnsupportedAlgorithm


def test_fingerprints_agree_from_every_entry_point(
    softhsm: SoftHsm,
    server_pair: KeyPair,
    run: Callable[..., Result],
) -> None:
    """KeyPair.load, load_or_generate (never generates for a URI) and
    ``callcp fingerprint URI`` name the same key."""
    uri = softhsm.uri("server")
    assert KeyPair.load_or_generate(uri).fingerprint == server_pair.fingerprint
    result = run("fingerprint", uri)
    assert result.returncode == 0, err(result)
    assert out(result).strip() == server_pair.fingerprint


# ==================================================================== failures


def load_in_fresh_process(uri: str, **env: str) -> str:
    """``KeyPair.load(uri)`` in a new process (a PKCS#11 login is the whole
    process's: after one key logged in, any session of that process may use
    the token, whatever PIN a later URI gives); what it printed."""
    code = (
        "import sys, callcp\n"
        "try:\n"
        "    print('loaded', callcp.KeyPair.load(sys.argv[1]).fingerprint)\n"
        "except callcp.KeyManagementError as exc:\n"
        "    print('refused:', exc)\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CALLCP_")}
    done = subprocess.run(
        [sys.executable, "-c", code, uri],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environ, **env},
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    return done.stdout.strip()


def test_wrong_pin_is_refused(softhsm: SoftHsm, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("0000\n")
    wrong.chmod(0o600)
    said = load_in_fresh_process(softhsm.uri("server", pin=False) + f"&pin-source=file:{wrong}")
    assert said.startswith("refused: the PKCS#11 token 'callcp-tests' refused the PIN"), said
    assert "0000" not in said


def test_no_pin_says_how_to_give_one(softhsm: SoftHsm) -> None:
    said = load_in_fresh_process(softhsm.uri("server", pin=False))
    assert said.startswith("refused: no RSA private key object='server'"), said
    assert "no PIN was given" in said and "pin-source=file" in said
    said = load_in_fresh_process(softhsm.uri("server", pin=False), CALLCP_PKCS11_PIN=PIN)
    assert said.startswith("loaded SHA256:"), said


def test_pin_from_the_environment(softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_PIN", PIN)
    named = softhsm.uri("server", pin=False) + "&pin-source=env:MY_PIN"
    assert Pkcs11Key(named).key_size == 2048
    monkeypatch.delenv("MY_PIN")
    with pytest.raises(KeyManagementError, match="'MY_PIN', is not set"):
        Pkcs11Key(named)


def test_a_pin_file_others_can_read_is_refused(
    softhsm: SoftHsm,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    loose = tmp_path / "loose-pin"
    loose.write_text(PIN)
    loose.chmod(0o644)
    uri = softhsm.uri("server", pin=False) + f"&pin-source=file:{loose}"
    with pytest.raises(
        KeyManagementError, match=r"PKCS#11 PIN file .* readable by every user.*chmod 600"
    ):
        KeyPair.load(uri)
    with caplog.at_level(logging.WARNING):
        assert KeyPair.load(uri, allow_insecure_permissions=True).key_size == 2048
    assert "loading it anyway" in caplog.text and PIN not in caplog.text


def test_a_deleted_key_costs_one_login_try(
    softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key deleted in the token, the login alive: its reconnections find
    it missing; the first tries the login again (and learns it is alive),
    the later ones do not (each try would leave a session open)."""
    from callcp import hsm

    monkeypatch.setattr(hsm, "RECONNECT_BACKOFF", 0.0)
    generate_key(softhsm.uri("gone"))
    key = Pkcs11Key(softhsm.uri("gone"))
    destroy_in_token(key, "gone")
    tries: List[bool] = []
    real = hsm._log_in

    def counted(*args: Any, **kwargs: Any) -> bool:
        login = hsm._logins.get((key._session._path, key._session._token.slot.slot_id))
        tries.append(bool(kwargs.get("again")) and login is not None and not login.confirmed)
        return real(*args, **kwargs)

    monkeypatch.setattr(hsm, "_log_in", counted)
    for _ in range(5):
        with pytest.raises(KeyManagementError, match="no RSA private key object='gone'"):
            key.sign(b"x", PSS, hashes.SHA256())
    assert sum(tries) == 1, tries


def test_pin_file_paths_must_be_absolute(softhsm: SoftHsm) -> None:
    base = softhsm.uri("server", pin=False)
    for source in ("file:pin", "./pin", "file:../pin", "pin"):
        with pytest.raises(KeyManagementError, match="absolute path|must be file:/path"):
            Pkcs11Key(f"{base}&pin-source={source}")


def test_one_process_one_pin_per_token(softhsm: SoftHsm, tmp_path: Path) -> None:
    """A login is the whole process's: a second key of the token with
    another PIN is refused rather than let in on the first key's login; a
    PIN the token refused is not tried again (tokens lock after a few)."""
    Pkcs11Key(softhsm.uri("server"))  # (this process is logged in)
    other = tmp_path / "other-pin"
    other.write_text("1111\n")
    other.chmod(0o600)
    with pytest.raises(KeyManagementError, match="logged in to PKCS#11 token .* with another PIN"):
        Pkcs11Key(softhsm.uri("server", pin=False) + f"&pin-source=file:{other}")
    code = (
        "import sys, callcp\n"
        "for attempt in (1, 2):\n"
        "    try:\n"
        "        callcp.KeyPair.load(sys.argv[1])\n"
        "    except callcp.KeyManagementError as exc:\n"
        "        print(exc)\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            softhsm.uri("server", pin=False) + f"&pin-source=file:{other}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    first, second = done.stdout.splitlines()
    assert "refused the PIN" in first and "refused this PIN before; it is not tried again" in second


def destroy_in_token(key: Pkcs11Key, label: str) -> None:
    """Delete the private key ``label`` in the key's token, on an rw session
    of this (logged-in) process, as an administrator's tool would."""
    import pkcs11

    from callcp import hsm

    path = key._session._path
    with hsm._library_lock(path):
        session = key._session._token.open(rw=True)
        try:
            attrs = {
                pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY,
                pkcs11.Attribute.LABEL: label,
            }
            for found in session.get_objects(attrs):
                found.destroy()
        finally:
            session.close()


def test_a_key_replaced_in_the_token_is_not_used(softhsm: SoftHsm) -> None:
    """The key deleted and another made under its label: after the lost
    handle, the key is looked up again and refused for its different
    modulus, and operations fail fast (one reconnection per RECONNECT_BACKOFF)."""
    from callcp import hsm

    generate_key(softhsm.uri("doomed"))
    key = Pkcs11Key(softhsm.uri("doomed"))
    ciphertext = key.public_key().encrypt(b"k" * 32, OAEP)
    assert key.decrypt(ciphertext, OAEP) == b"k" * 32
    destroy_in_token(key, "doomed")  # (the key, deleted in the token by someone else)
    generate_key(softhsm.uri("doomed"))  # (another key under its label)
    with pytest.raises(KeyManagementError, match="no longer the key this process loaded"):
        key.sign(b"x", PSS, hashes.SHA256())
    connects: List[int] = []
    real = key._session._connect
    key._session._connect = lambda: (connects.append(1), real())[1]  # type: ignore[method-assign]
    for _ in range(20):
        with pytest.raises(ValueError, match="Decryption failed"):
            key.decrypt(ciphertext, OAEP)
    assert len(connects) <= 1 < hsm.RECONNECT_BACKOFF * 1000


def test_missing_token_key_and_library(softhsm: SoftHsm) -> None:
    pin = f"pin-source=file:{softhsm.pin_file}"
    with pytest.raises(
        KeyManagementError, match=r"no PKCS#11 token matches.*tokens present: .*'callcp-tests'"
    ):
        Pkcs11Key(f"pkcs11:token=nope;object=server?module-name=softhsm2&{pin}")
    with pytest.raises(KeyManagementError, match="no RSA private key object='nope'"):
        Pkcs11Key(f"pkcs11:token={softhsm.label};object=nope?module-name=softhsm2&{pin}")
    with pytest.raises(KeyManagementError, match="2 PKCS#11 tokens match"):
        Pkcs11Key(f"pkcs11:object=server?module-name=softhsm2&{pin}")
    with pytest.raises(KeyManagementError, match="no PKCS#11 library named 'nosuchhsm'"):
        Pkcs11Key(f"pkcs11:object=server?module-name=nosuchhsm&{pin}")
    with pytest.raises(KeyManagementError, match="no PKCS#11 library at"):
        Pkcs11Key(f"pkcs11:object=server?module-path=/nonexistent/lib.so&{pin}")


def test_without_python_pkcs11_the_error_names_the_extra(
    softhsm: SoftHsm,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pkcs11", None)
    wording = (
        r"pip install python-pkcs11 \(or, in the callcp source directory, pip install '\.\[hsm\]'\)"
    )
    with pytest.raises(KeyManagementError, match=wording):
        KeyPair.load(softhsm.uri("server"))


def test_generate_never_replaces_a_key(softhsm: SoftHsm) -> None:
    with pytest.raises(KeyManagementError, match="already holds a private key with label 'server'"):
        generate_key(softhsm.uri("server"))
    with pytest.raises(KeyManagementError, match="add object=LABEL"):
        generate_key(
            f"pkcs11:token={OTHER_LABEL}?module-name=softhsm2&pin-source=file:{softhsm.pin_file}"
        )
    with pytest.raises(KeyManagementError, match="choose one of 2048, 3072, 4096"):
        generate_key(softhsm.uri("odd"), 1024)


# ======================================================= threads, fork, sessions


def test_many_threads_share_the_token(server_pair: KeyPair) -> None:
    """Concurrent signatures and decryptions from many threads are all
    right (they take turns in the library: SoftHSM2 crashes otherwise)."""
    key = server_pair.private_key
    assert isinstance(key, Pkcs11Key)
    public = key.public_key()
    failures: List[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                secret = os.urandom(32)
                assert key.decrypt(public.encrypt(secret, OAEP), OAEP) == secret
                public.verify(key.sign(secret, PSS, hashes.SHA256()), secret, PSS, hashes.SHA256())
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    assert not failures, failures


def test_a_lost_session_is_replaced(softhsm: SoftHsm, caplog: pytest.LogCaptureFixture) -> None:
    """The key's session closed under it (a token restarted, say): the
    operation is retried once on a new session, with a warning."""
    key = Pkcs11Key(softhsm.uri("server"))
    key.sign(b"warm", PSS, hashes.SHA256())
    key._session._session.close()  # (C_CloseSession: it did not log in, so no logout)
    with caplog.at_level(logging.WARNING, logger="callcp.hsm"):
        signature = key.sign(b"after", PSS, hashes.SHA256())
    key.public_key().verify(signature, b"after", PSS, hashes.SHA256())
    assert "opening a new session" in caplog.text


def test_a_lost_login_is_redone(softhsm: SoftHsm) -> None:
    """The token forgot the process's login (C_Logout: SoftHSM then calls
    the key's handle invalid): the key finds itself missing, logs in again,
    and goes on, for every key of the token."""
    from callcp import hsm

    server = Pkcs11Key(softhsm.uri("server"))
    client = Pkcs11Key(softhsm.uri("client"))
    server.sign(b"warm", PSS, hashes.SHA256())
    login = hsm._logins[(server._session._path, server._session._token.slot.slot_id)]
    login.holder.close()  # (C_Logout, then C_CloseSession)
    for key in (server, client, server):
        for _ in range(2):
            signature = key.sign(b"again", PSS, hashes.SHA256())
            key.public_key().verify(signature, b"again", PSS, hashes.SHA256())


def in_a_forked_child(body: Callable[[], bytes]) -> bytes:
    """Run ``body`` in a forked child; what it returned, or its exception's repr."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, body())
        except BaseException as exc:
            os.write(write, repr(exc).encode()[:500])
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read()
    os.waitpid(pid, 0)
    return said


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
def test_a_failed_reconnection_in_a_child_keeps_nothing_of_the_parent(
    server_pair: KeyPair, client_pair: KeyPair
) -> None:
    """In a forked worker, one key's first reconnection fails once; later
    it reconnects and signs with ITS key (the parent's session handles,
    which the child's library may have given to another key, are never
    used)."""
    from callcp import hsm

    server, client = server_pair.private_key, client_pair.private_key
    assert isinstance(server, Pkcs11Key) and isinstance(client, Pkcs11Key)
    server.sign(b"p", PSS, hashes.SHA256())
    client.sign(b"p", PSS, hashes.SHA256())

    def child() -> bytes:
        hsm.RECONNECT_BACKOFF = 0.0
        real = hsm._find_token
        failed: List[int] = []

        def flaky(*args: Any) -> Any:
            if not failed:
                failed.append(1)
                raise KeyManagementError("the token is not there yet")
            return real(*args)

        hsm._find_token = flaky
        try:
            client.sign(b"c", PSS, hashes.SHA256())
            return b"no failure"
        except KeyManagementError:
            server.sign(b"s", PSS, hashes.SHA256())  # (the server key reconnects first)
            for _ in range(3):
                signature = client.sign(b"c", PSS, hashes.SHA256())
                client.public_key().verify(signature, b"c", PSS, hashes.SHA256())
            return b"ok"

    assert in_a_forked_child(child) == b"ok"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
def test_a_forked_child_opens_its_own_sessions(server_pair: KeyPair) -> None:
    key = server_pair.private_key
    public = key.public_key()
    secret = os.urandom(32)
    ciphertext = public.encrypt(secret, OAEP)
    key.decrypt(ciphertext, OAEP)  # (the parent's sessions exist)

    def child() -> bytes:
        ok = key.decrypt(ciphertext, OAEP) == secret and key._session._pid == os.getpid()
        return b"ok" if ok else b"wrong"

    assert in_a_forked_child(child) == b"ok"
    assert key.decrypt(ciphertext, OAEP) == secret  # (the parent's still work)


# ============================================================= end to end


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_server_and_client_keys_in_the_token(
    flavour: str,
    softhsm: SoftHsm,
    server_pair: KeyPair,
    client_pair: KeyPair,
    run: Callable[..., Result],
) -> None:
    """The Must-show: the server's key in the token (given by URI), a client
    pinning the fingerprint ``callcp fingerprint URI`` printed, messages
    both ways; the client's authentication key in the token too."""
    printed = run("fingerprint", softhsm.uri("server"))
    assert printed.returncode == 0, err(printed)
    pinned = out(printed).strip()
    adapter = Adapter(client=flavour, server=flavour, key=softhsm.uri("server"))
    try:
        handler = Echo(prefix=b"hsm:")
        srv = adapter.serve(handler, authorized_keys=[client_pair.fingerprint])
        assert srv.fingerprint == pinned == server_pair.fingerprint
        with adapter.connect(
            srv.port, server_fingerprint=pinned, client_key=softhsm.uri("client")
        ) as conn:
            for i in range(3):
                assert conn.request(b"m%d" % i) == b"hsm:m%d" % i
            assert conn.peer_fingerprint == pinned
        assert handler.peers.get(timeout=10) == client_pair.fingerprint
    finally:
        adapter.close()


def test_cli_keygen_serve_and_send_with_token_keys(
    softhsm: SoftHsm,
    client_pair: KeyPair,
    run: Callable[..., Result],
    home: Path,
    tmp_path: Path,
) -> None:
    """``callcp keygen --pkcs11`` makes a key in the token; ``callcp serve
    --key URI --workers 2`` (each worker its own sessions) answers ``callcp
    send --client-key URI``."""
    made = run("keygen", "--pkcs11", softhsm.uri("cli-server"), "--public", str(tmp_path / "p.pem"))
    assert made.returncode == 0, err(made)
    fingerprint = out(made).strip().splitlines()[-1].split()[-1]
    assert "in token callcp-tests" in out(made) and PIN not in out(made)
    assert callcp.fingerprint(load_public_key(tmp_path / "p.pem")) == fingerprint
    again = run("keygen", "--pkcs11", softhsm.uri("cli-server"))
    assert again.returncode != 0 and "already holds a private key" in err(again)
    clash = run("keygen", "--pkcs11", softhsm.uri("x"), "--force")
    assert clash.returncode == 2 and "do not apply" in err(clash)

    authorized = tmp_path / "authorized"
    authorized.write_text(client_pair.fingerprint + "\n")
    argv = ["--port", "0", "--workers", "2", "--upper", "--authorized-keys", str(authorized)]
    server = CliServer(home, [*argv, "--key", softhsm.uri("cli-server")], tmp_path / "serve.log")
    try:
        assert server.fingerprint == fingerprint
        for i in range(4):
            result = run(
                "send",
                *server.address,
                f"w{i}",
                "--fingerprint",
                fingerprint,
                "--client-key",
                softhsm.uri("client"),
            )
            assert result.returncode == 0, err(result) + server.log()
            assert out(result) == f"W{i}\n"
    finally:
        assert server.stop(signal.SIGTERM) == 0, server.log()
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_failing_token_fails_connections_not_the_server(
    flavour: str,
    softhsm: SoftHsm,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The token fails (a device error) in a handshake's decryption: that
    handshake fails exactly as one with a bad ciphertext does (no oracle:
    the implicit rejection), the failure is logged, the next client is
    served.  It fails when the server signs its share: connections are
    refused (retryable), the token is asked again only after KEY_RETRY, and
    once it works again clients are served."""
    import pkcs11

    from callcp import _engine

    monkeypatch.setattr(_engine, "KEY_RETRY", 0.2)
    pair = KeyPair.load(softhsm.uri("server"))
    key = pair.private_key
    assert isinstance(key, Pkcs11Key)
    real = key._session.run
    broken = threading.Event()
    calls: List[int] = []

    def failing(operation: Callable[[Any], Any]) -> Any:
        if broken.is_set():
            calls.append(1)
            raise pkcs11.DeviceError()
        return real(operation)

    monkeypatch.setattr(key._session, "run", failing)
    adapter = Adapter(client=flavour, server=flavour, key=pair)
    try:
        srv = adapter.serve(Echo(prefix=b"ok:"), ticket_lifetime=0)  # (full handshakes)

        def request(message: bytes, **options: Any) -> bytes:
            with adapter.connect(srv.port, server_fingerprint=srv.fingerprint, **options) as conn:
                reply: bytes = conn.request(message)
                return reply

        assert request(b"first") == b"ok:first"  # (its share signed)
        broken.set()  # (the next full handshake's decryption fails)
        with (
            caplog.at_level(logging.WARNING, logger="callcp.hsm"),
            pytest.raises(callcp.CallcpError),
        ):
            request(b"second")
        assert "failed to decrypt: DeviceError" in caplog.text
        assert srv.log is not None
        assert wait_until(  # (as with a bad ciphertext)
            lambda: bool(srv.log.about("the two sides derived different keys"))
        ), srv.log.messages()
        broken.clear()
        assert request(b"third") == b"ok:third"

        broken.set()
        calls.clear()
        srv.server._core.shares.forget()  # (as when the share is due: a new one to sign)
        for _ in range(5):
            with pytest.raises(callcp.HandshakeAborted) as refused:
                request(b"refused")
            assert refused.value.retryable
        assert 1 <= len(calls) <= 3  # (not one token call per refused connection)
        broken.clear()
        again = callcp.Retry(attempts=20, backoff=0.05, max_backoff=0.1)
        assert request(b"fifth", retry=again) == b"ok:fifth"
        logged = "\n".join(srv.log.messages()) if srv.log is not None else ""
        assert "the server key cannot sign a share: key object='server'" in logged, logged
        assert "refused 127.0.0.1" in logged and "the server key is unavailable" in logged
        assert "Traceback" not in logged
    finally:
        adapter.close()


def test_the_softhsm2_walkthrough_in_the_docs_works(tmp_path: Path) -> None:
    """docs/hsm.md's "Try it with SoftHSM2", run as written (the package
    install aside; the server on a free port, stopped once it listens): it
    prints what the page shows, but for the slot number, the key's id, the
    fingerprint and the port, and the server presents the key ``keygen
    --pkcs11`` made."""
    page = (Path(__file__).parent.parent / "docs" / "hsm.md").read_text()
    block = page.split("## Try it with SoftHSM2", 1)[1].split("```", 2)[1]
    commands = [line[2:] for line in block.splitlines() if line.startswith("$ ")]
    shown = [line for line in block.splitlines()[1:] if line and not line.startswith("$ ")]
    assert commands[0] == "sudo apt-get install softhsm2"
    *setup, serve = commands[1:]
    assert serve.startswith("callcp serve --key ")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLCP_", "SOFTHSM2_"))}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    script = "set -e\n" + "\n".join(setup) + f"\nexec {serve} --port 0\n"
    server = subprocess.Popen(
        ["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        said = [server.stdout.readline().rstrip("\n") for _ in shown]
    finally:
        server.terminate()
        _, errors = server.communicate(timeout=30)
    varying = re.compile(r"slot \d+|id=\S+|SHA256:[A-Za-z0-9+/]{43}|127\.0\.0\.1:\d+")
    assert [varying.sub("*", line) for line in said] == [
        varying.sub("*", line) for line in shown
    ], (said, errors)
    fingerprint = said[-2].split()[-1]
    assert said[-1].endswith(f"(server key {fingerprint})")


def test_the_hsm_benchmark_runs(tmp_path: Path) -> None:
    """benchmarks/hsm_bench.py (the figures in docs/hsm.md), at a tiny size."""
    script = Path(__file__).parent.parent / "benchmarks" / "hsm_bench.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLCP_", "SOFTHSM2_"))}
    done = subprocess.run(
        [sys.executable, str(script), "--reps", "1", "--seconds", "0.3", "--ops", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    rows = {line[:28].strip(): line[28:].split() for line in done.stdout.splitlines()[2:]}
    assert set(rows) == {"RSA-PSS sign, us/op", "RSA-OAEP decrypt, us/op", "full handshakes/s"}
    assert all(float(value) > 0 for values in rows.values() for value in values), done.stdout
