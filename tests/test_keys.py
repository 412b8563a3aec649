"""Key files: generation, atomic 0600 saving, loading (Callcp 1.0 files too), errors."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from callcp._core.errors import KeyManagementError
from callcp._core.keys import fingerprint
from callcp.keys import PASSPHRASE_ENV, KeyPair, load_public_key, public_key_from_pem

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


@pytest.fixture(scope="module")
def keypair() -> KeyPair:
    # RSA generation is slow: one 2048-bit key for the whole module.
    return KeyPair.generate()


@pytest.fixture(scope="module")
def other_keypair() -> KeyPair:
    return KeyPair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(autouse=True)
def _no_env_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _pem_body_lines(pem: bytes) -> list[str]:
    return [ln for ln in pem.decode().splitlines() if ln and not ln.startswith("-----")]


@pytest.fixture(autouse=True)
def _private_umask() -> Any:
    """Files these tests write are private (0600), as a careful operator's
    are: the permission checks have tests of their own below."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def _write_callcp1_files(key: rsa.RSAPrivateKey, private: Path, public: Path) -> None:
    """What Callcp 1.0 wrote: unencrypted PKCS#8 and SubjectPublicKeyInfo, plain writes."""
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


# -- generation and properties ------------------------------------------------


def test_generate_default(keypair: KeyPair) -> None:
    assert keypair.key_size == 2048
    assert keypair.private_key.private_numbers().public_numbers.e == 65537
    assert keypair.fingerprint == fingerprint(keypair.public_key)
    assert keypair.fingerprint.startswith("SHA256:")
    assert keypair.public_der == keypair.public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert keypair.public_pem().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert keypair.private_pem().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_repr_has_no_key_material(keypair: KeyPair) -> None:
    text = repr(keypair)
    assert keypair.fingerprint in text
    for line in _pem_body_lines(keypair.private_pem()):
        assert line not in text


def test_generate_3072_accepted() -> None:
    kp = KeyPair.generate(3072)
    assert kp.key_size == 3072


@pytest.mark.parametrize("bits", [1024, 2047, 2049, 8192, True])
def test_generate_refuses_other_sizes(bits: int) -> None:
    with pytest.raises(KeyManagementError, match="2048, 3072, 4096"):
        KeyPair.generate(bits)


def test_constructor_refuses_small_and_non_rsa_keys() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(KeyManagementError, match="1024 bits"):
        KeyPair(small)
    with pytest.raises(TypeError):
        KeyPair(ec.generate_private_key(ec.SECP256R1()))  # type: ignore[arg-type]


# -- saving: round trip, modes, atomicity --------------------------------------


def test_save_load_round_trip(keypair: KeyPair, tmp_path: Path) -> None:
    priv, pub = tmp_path / "server_private.pem", tmp_path / "server_public.pem"
    keypair.save(priv, pub)
    loaded = KeyPair.load(priv)
    assert loaded.fingerprint == keypair.fingerprint
    assert loaded.public_der == keypair.public_der
    assert fingerprint(load_public_key(pub)) == keypair.fingerprint
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes() == keypair.public_pem()
    # str paths work too
    assert KeyPair.load(str(priv)).fingerprint == keypair.fingerprint


@posix_only
def test_file_modes_regardless_of_umask(keypair: KeyPair, tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        keypair.save(tmp_path / "a" / "priv.pem", tmp_path / "a" / "pub.pem")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a" / "priv.pem") == 0o600
    assert _mode(tmp_path / "a" / "pub.pem") == 0o644
    old = os.umask(0o077)
    try:
        keypair.save(tmp_path / "b" / "priv.pem", tmp_path / "b" / "pub.pem")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "b" / "priv.pem") == 0o600
    assert _mode(tmp_path / "b" / "pub.pem") == 0o644


@posix_only
def test_private_key_is_0600_before_it_appears(
    keypair: KeyPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, int, bytes]] = []
    real_replace = os.replace

    def spy(src: Any, dst: Any) -> None:
        # The temporary file is complete and already private when it is renamed.
        seen.append((os.path.basename(dst), _mode(Path(src)), Path(src).read_bytes()))
        assert os.path.dirname(os.fspath(src)) == os.path.dirname(os.fspath(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    keypair.save(tmp_path / "priv.pem", tmp_path / "pub.pem")
    assert [(name, mode) for name, mode, _ in seen] == [("priv.pem", 0o600), ("pub.pem", 0o644)]
    assert seen[0][2] == keypair.private_pem()


def test_save_replaces_existing_and_leaves_no_temp_files(keypair: KeyPair, tmp_path: Path) -> None:
    priv, pub = tmp_path / "priv.pem", tmp_path / "pub.pem"
    priv.write_bytes(b"old contents")
    pub.write_bytes(b"old contents")
    keypair.save(priv, pub)
    assert KeyPair.load(priv).fingerprint == keypair.fingerprint
    assert pub.read_bytes() == keypair.public_pem()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["priv.pem", "pub.pem"]
    if os.name == "posix":
        assert _mode(priv) == 0o600


def test_failed_save_keeps_old_file_and_cleans_up(
    keypair: KeyPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    priv = tmp_path / "priv.pem"
    priv.write_bytes(b"old contents")

    def broken(src: Any, dst: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(KeyManagementError) as info:
        keypair.save(priv)
    assert str(priv) in str(info.value)
    assert priv.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["priv.pem"]


def test_save_creates_parent_directories(keypair: KeyPair, tmp_path: Path) -> None:
    priv = tmp_path / "x" / "y" / "priv.pem"
    pub = tmp_path / "z" / "pub.pem"
    keypair.save(priv, pub)
    assert KeyPair.load(priv).fingerprint == keypair.fingerprint
    assert pub.exists()


def test_save_into_unwritable_place_names_path(keypair: KeyPair, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(KeyManagementError) as info:
        keypair.save(blocker / "priv.pem")
    assert str(blocker) in str(info.value)
    target = tmp_path / "adir"
    target.mkdir()
    with pytest.raises(KeyManagementError) as info:
        keypair.save(target)
    assert str(target) in str(info.value)


# -- Callcp 1.0 files -----------------------------------------------------------


def test_loads_callcp1_files(keypair: KeyPair, tmp_path: Path) -> None:
    priv, pub = tmp_path / "server_private.pem", tmp_path / "server_public.pem"
    _write_callcp1_files(keypair.private_key, priv, pub)
    before = (priv.read_bytes(), pub.read_bytes(), os.stat(priv).st_mtime_ns)
    assert KeyPair.load(priv).fingerprint == keypair.fingerprint
    assert fingerprint(load_public_key(pub)) == keypair.fingerprint
    loaded = KeyPair.load_or_generate(priv, pub)
    assert loaded.fingerprint == keypair.fingerprint
    # Loaded as they are: not rewritten.
    assert (priv.read_bytes(), pub.read_bytes(), os.stat(priv).st_mtime_ns) == before


def test_loads_callcp1_files_even_with_env_passphrase(
    keypair: KeyPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    priv, pub = tmp_path / "server_private.pem", tmp_path / "server_public.pem"
    _write_callcp1_files(keypair.private_key, priv, pub)
    monkeypatch.setenv(PASSPHRASE_ENV, "some passphrase")
    assert KeyPair.load_or_generate(priv, pub).fingerprint == keypair.fingerprint


def test_loads_traditional_rsa_pem(keypair: KeyPair, tmp_path: Path) -> None:
    priv = tmp_path / "trad.pem"
    priv.write_bytes(
        keypair.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    assert priv.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert KeyPair.load(priv).fingerprint == keypair.fingerprint
    encrypted = tmp_path / "trad-enc.pem"
    encrypted.write_bytes(
        keypair.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    assert KeyPair.load(encrypted, password=b"pw").fingerprint == keypair.fingerprint


def test_pkcs1_public_key_accepted(keypair: KeyPair) -> None:
    pem = keypair.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
    )
    assert fingerprint(public_key_from_pem(pem)) == keypair.fingerprint


# -- passphrases ------------------------------------------------------------------


def test_passphrase_argument(keypair: KeyPair, tmp_path: Path) -> None:
    priv = tmp_path / "priv.pem"
    keypair.save(priv, password="correct horse")
    assert priv.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert KeyPair.load(priv, password="correct horse").fingerprint == keypair.fingerprint
    assert KeyPair.load(priv, password=b"correct horse").fingerprint == keypair.fingerprint

    with pytest.raises(KeyManagementError, match="encrypted") as info:
        KeyPair.load(priv)
    assert str(priv) in str(info.value)
    assert PASSPHRASE_ENV in str(info.value)

    with pytest.raises(KeyManagementError, match="wrong passphrase") as info:
        KeyPair.load(priv, password="battery staple")
    assert str(priv) in str(info.value)
    assert "battery" not in str(info.value)


def test_passphrase_from_environment(
    keypair: KeyPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    priv = tmp_path / "priv.pem"
    monkeypatch.setenv(PASSPHRASE_ENV, "from the environment")
    keypair.save(priv)
    assert priv.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert KeyPair.load(priv).fingerprint == keypair.fingerprint
    # An explicit password wins over the environment.
    with pytest.raises(KeyManagementError, match="wrong passphrase"):
        KeyPair.load(priv, password="something else")
    # from_pem / private_pem do not consult the environment.
    assert keypair.private_pem().startswith(b"-----BEGIN PRIVATE KEY-----")
    with pytest.raises(KeyManagementError, match="no passphrase"):
        KeyPair.from_pem(priv.read_bytes())
    monkeypatch.delenv(PASSPHRASE_ENV)
    with pytest.raises(KeyManagementError, match="encrypted") as info:
        KeyPair.load(priv)
    assert str(priv) in str(info.value)


def test_empty_environment_passphrase_means_none(
    keypair: KeyPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "")
    keypair.save(tmp_path / "priv.pem")
    assert (tmp_path / "priv.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_empty_password_refused(keypair: KeyPair, tmp_path: Path) -> None:
    with pytest.raises(KeyManagementError, match="empty"):
        keypair.save(tmp_path / "priv.pem", password="")
    with pytest.raises(TypeError):
        keypair.private_pem(password=1234)  # type: ignore[arg-type]


def test_private_pem_encrypted_is_standard(keypair: KeyPair) -> None:
    """An encrypted key is OpenSSH's format (what ssh-keygen writes and
    reads): AES-256-CTR under bcrypt-pbkdf with KDF_ROUNDS (16) rounds."""
    import base64
    import time

    from callcp.keys import KDF_ROUNDS

    pem = keypair.private_pem(password=b"pw")
    started = time.perf_counter()
    key = serialization.load_ssh_private_key(pem, password=b"pw")
    unlock = time.perf_counter() - started
    assert isinstance(key, rsa.RSAPrivateKey)
    assert fingerprint(key) == keypair.fingerprint
    assert KeyPair.from_pem(pem, password="pw").fingerprint == keypair.fingerprint
    blob = base64.b64decode(b"".join(pem.splitlines()[1:-1]))
    assert blob.startswith(b"openssh-key-v1\x00") and b"aes256-ctr" in blob and b"bcrypt" in blob
    kdf_options = blob[blob.index(b"bcrypt") + 6 :]  # string kdfoptions: salt, then rounds
    salt_len = int.from_bytes(kdf_options[4:8], "big")
    rounds = int.from_bytes(kdf_options[8 + salt_len : 12 + salt_len], "big")
    assert KDF_ROUNDS == 16 and rounds == KDF_ROUNDS and salt_len == 16
    print(f"\nunlocking an encrypted key took {unlock * 1000:.0f} ms")  # (shown with -s)


@pytest.mark.parametrize(
    "fmt",
    [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL],
    ids=["pkcs8", "traditional-openssl"],
)
def test_older_encrypted_key_files_still_load(keypair: KeyPair, fmt: Any) -> None:
    """Key files that callcp wrote before (PKCS#8, BestAvailableEncryption)
    and OpenSSL's traditional encrypted form keep loading."""
    enc = serialization.BestAvailableEncryption(b"pw")
    pem = keypair.private_key.private_bytes(serialization.Encoding.PEM, fmt, enc)
    assert KeyPair.from_pem(pem, password="pw").fingerprint == keypair.fingerprint
    with pytest.raises(KeyManagementError, match="wrong passphrase"):
        KeyPair.from_pem(pem, password="nope")


def test_openssh_keys_errors_are_clear(keypair: KeyPair) -> None:
    pem = keypair.private_pem(password=b"pw")
    with pytest.raises(KeyManagementError, match="encrypted and no passphrase"):
        KeyPair.from_pem(pem)
    with pytest.raises(KeyManagementError, match="wrong passphrase"):
        KeyPair.from_pem(pem, password="wrong")
    plain = keypair.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    assert KeyPair.from_pem(plain).fingerprint == keypair.fingerprint  # (ssh-keygen's files)
    with pytest.raises(KeyManagementError, match="malformed"):
        KeyPair.from_pem(plain[:60] + b"!!!!" + plain[64:])


# -- load errors: each names the file --------------------------------------------


@pytest.mark.parametrize(
    ("contents", "cause"),
    [
        (b"", "not a PEM file"),
        (b"this is not a key\n", "not a PEM file"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "malformed"),
        (b"-----BEGIN PRIVATE KEY-----\nMIIB\n", "malformed"),
        (b"\x00\xff" * 100, "not a PEM file"),
    ],
)
def test_garbage_private_key(tmp_path: Path, contents: bytes, cause: str) -> None:
    priv = tmp_path / "priv.pem"
    priv.write_bytes(contents)
    with pytest.raises(KeyManagementError, match=cause) as info:
        KeyPair.load(priv)
    assert str(priv) in str(info.value)


def test_corrupted_key_message_has_no_key_material(keypair: KeyPair, tmp_path: Path) -> None:
    pem = keypair.private_pem()
    lines = pem.decode().splitlines()
    lines[5] = "!!!!" + lines[5][4:]
    priv = tmp_path / "priv.pem"
    priv.write_text("\n".join(lines) + "\n")
    with pytest.raises(KeyManagementError) as info:
        KeyPair.load(priv)
    message = str(info.value)
    assert str(priv) in message
    for line in _pem_body_lines(pem):
        assert line not in message


def test_public_key_in_private_key_file(keypair: KeyPair, tmp_path: Path) -> None:
    path = tmp_path / "pub.pem"
    path.write_bytes(keypair.public_pem())
    with pytest.raises(KeyManagementError, match="public key, not a private key") as info:
        KeyPair.load(path)
    assert str(path) in str(info.value)
    path.write_bytes(keypair.private_pem())
    with pytest.raises(KeyManagementError, match="private key, not a public key") as info2:
        load_public_key(path)
    assert str(path) in str(info2.value)


def test_non_rsa_keys_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    priv = tmp_path / "ec.pem"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyManagementError, match="EC key") as info:
        KeyPair.load(priv)
    assert str(priv) in str(info.value)
    pub = tmp_path / "ec_pub.pem"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyManagementError, match="EC key") as info:
        load_public_key(pub)
    assert str(pub) in str(info.value)


def test_small_rsa_key_file_refused(tmp_path: Path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    priv = tmp_path / "small.pem"
    priv.write_bytes(
        small.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyManagementError, match="1024 bits") as info:
        KeyPair.load(priv)
    assert str(priv) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pem"
    with pytest.raises(KeyManagementError, match="no such file") as info:
        KeyPair.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(KeyManagementError, match="no such file") as info:
        load_public_key(path)
    assert str(path) in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    path = tmp_path / "adir"
    path.mkdir()
    with pytest.raises(KeyManagementError, match="directory") as info:
        KeyPair.load(path)
    assert str(path) in str(info.value)


@posix_only
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(keypair: KeyPair, tmp_path: Path) -> None:
    priv = tmp_path / "priv.pem"
    keypair.save(priv)
    priv.chmod(0)
    try:
        with pytest.raises(KeyManagementError, match="permission denied") as info:
            KeyPair.load(priv)
        assert str(priv) in str(info.value)
    finally:
        priv.chmod(0o600)


def test_permission_denied_simulated(
    keypair: KeyPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same path as test_unreadable_file, also exercised when running as root.
    priv = tmp_path / "priv.pem"
    keypair.save(priv)
    real_open = os.open

    def fake_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(file, int) and os.fspath(file) == os.fspath(priv):
            raise PermissionError(13, "Permission denied", os.fspath(priv))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    with pytest.raises(KeyManagementError, match="permission denied") as info:
        KeyPair.load(priv)
    assert str(priv) in str(info.value)


def test_from_pem_errors_without_path() -> None:
    with pytest.raises(KeyManagementError, match="PEM data"):
        KeyPair.from_pem(b"garbage")
    with pytest.raises(KeyManagementError, match="PEM data"):
        public_key_from_pem(b"garbage")


# -- load_or_generate ----------------------------------------------------------------


def test_load_or_generate_first_run_then_load(tmp_path: Path) -> None:
    priv, pub = tmp_path / "keys" / "priv.pem", tmp_path / "keys" / "pub.pem"
    first = KeyPair.load_or_generate(priv, pub)
    assert priv.exists() and pub.exists()
    if os.name == "posix":
        assert _mode(priv) == 0o600
        assert _mode(pub) == 0o644
    assert sorted(p.name for p in priv.parent.iterdir()) == ["priv.pem", "pub.pem"]
    second = KeyPair.load_or_generate(priv, pub)
    assert second.fingerprint == first.fingerprint
    assert fingerprint(load_public_key(pub)) == first.fingerprint


def test_load_or_generate_with_passphrase(
    keypair: KeyPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    priv = tmp_path / "priv.pem"
    monkeypatch.setattr(KeyPair, "generate", classmethod(lambda cls, bits=2048: keypair))
    KeyPair.load_or_generate(priv, password="pw")
    assert priv.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert KeyPair.load_or_generate(priv, password="pw").fingerprint == keypair.fingerprint
    with pytest.raises(KeyManagementError, match="encrypted"):
        KeyPair.load_or_generate(priv)


def test_load_or_generate_writes_missing_public(keypair: KeyPair, tmp_path: Path) -> None:
    priv, pub = tmp_path / "priv.pem", tmp_path / "pub.pem"
    keypair.save(priv)
    loaded = KeyPair.load_or_generate(priv, pub)
    assert loaded.fingerprint == keypair.fingerprint
    assert pub.read_bytes() == keypair.public_pem()


def test_load_or_generate_mismatched_pair(
    keypair: KeyPair, other_keypair: KeyPair, tmp_path: Path
) -> None:
    priv, pub = tmp_path / "priv.pem", tmp_path / "pub.pem"
    keypair.save(priv)
    pub.write_bytes(other_keypair.public_pem())
    with pytest.raises(KeyManagementError, match="does not match") as info:
        KeyPair.load_or_generate(priv, pub)
    message = str(info.value)
    assert str(priv) in message and str(pub) in message
    assert keypair.fingerprint in message and other_keypair.fingerprint in message
    # Nothing was overwritten.
    assert pub.read_bytes() == other_keypair.public_pem()


def test_load_or_generate_bad_public_file(keypair: KeyPair, tmp_path: Path) -> None:
    priv, pub = tmp_path / "priv.pem", tmp_path / "pub.pem"
    keypair.save(priv)
    pub.write_bytes(b"junk")
    with pytest.raises(KeyManagementError) as info:
        KeyPair.load_or_generate(priv, pub)
    assert str(pub) in str(info.value)


def test_load_or_generate_refuses_bad_bits(tmp_path: Path) -> None:
    with pytest.raises(KeyManagementError, match="1024"):
        KeyPair.load_or_generate(tmp_path / "priv.pem", bits=1024)
    assert not (tmp_path / "priv.pem").exists()


def test_load_or_generate_concurrent_first_run_keeps_winner(
    keypair: KeyPair, other_keypair: KeyPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If another process creates the key while we generate ours, theirs wins."""
    priv, pub = tmp_path / "priv.pem", tmp_path / "pub.pem"

    def racing_generate(cls: type[KeyPair], bits: int = 2048) -> KeyPair:
        other_keypair.save(priv)  # the other process finishes first
        return keypair

    monkeypatch.setattr(KeyPair, "generate", classmethod(racing_generate))
    loaded = KeyPair.load_or_generate(priv, pub)
    assert loaded.fingerprint == other_keypair.fingerprint
    assert KeyPair.load(priv).fingerprint == other_keypair.fingerprint
    assert fingerprint(load_public_key(pub)) == other_keypair.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["priv.pem", "pub.pem"]


def test_load_or_generate_dangling_symlink_is_not_replaced(tmp_path: Path) -> None:
    if not hasattr(os, "symlink"):
        pytest.skip("no symlinks")
    priv = tmp_path / "priv.pem"
    try:
        priv.symlink_to(tmp_path / "missing-target.pem")
    except OSError:
        pytest.skip("cannot create symlinks here")
    with pytest.raises(KeyManagementError) as info:
        KeyPair.load_or_generate(priv)
    assert str(priv) in str(info.value)
    assert priv.is_symlink()


# -- permissions of private key files ----------------------------------------------


@pytest.mark.parametrize(
    ("mode", "refused"),
    [
        (0o600, None), (0o640, None), (0o400, None), (0o644, "readable by every user"),
        (0o660, "writable by its group"), (0o666, "every user and writable by every user"),
    ],
)  # fmt: skip
def test_private_key_files_others_may_read_or_write_are_refused(
    keypair: KeyPair, tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, refused: Any
) -> None:
    path = tmp_path / "key.pem"
    keypair.save(path)
    path.chmod(mode)
    if refused is None:
        assert KeyPair.load(path).fingerprint == keypair.fingerprint
        return
    with pytest.raises(KeyManagementError, match=refused) as info:
        KeyPair.load(path)
    assert f"chmod 600 {path}" in str(info.value)
    assert "allow_insecure_permissions=True" in str(info.value)
    with caplog.at_level(logging.WARNING, logger="callcp"):
        loaded = KeyPair.load(path, allow_insecure_permissions=True)
    assert loaded.fingerprint == keypair.fingerprint
    assert "loading it anyway" in caplog.text
    with pytest.raises(KeyManagementError, match="chmod 600"):  # (first-run servers too)
        KeyPair.load_or_generate(path)


def test_a_key_file_owned_by_another_user_is_refused(keypair: KeyPair, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")  # (CI runs as root)
    path = tmp_path / "key.pem"
    keypair.save(path)
    os.chown(path, 65534, -1)  # nobody: it could replace the key
    with pytest.raises(KeyManagementError, match="owned by another user"):
        KeyPair.load(path)
    assert KeyPair.load(path, allow_insecure_permissions=True).fingerprint == keypair.fingerprint
