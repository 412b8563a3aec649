"""The cost of a server key in a PKCS#11 token (SoftHSM2) against one in a file.

    python benchmarks/hsm_bench.py [--reps 5] [--seconds 3]

Makes a SoftHSM2 token in a temporary directory with a 2048-bit key in it,
and a 2048-bit key file, then measures, alternating the two in every round:

- the RSA operations a server does: one RSA-PSS signature (a share), one
  RSA-OAEP decryption (each full handshake), in microseconds (medians);
- full handshakes per second (a new connection, handshake without a
  session ticket, one 64-byte request and reply), a blocking client against
  a blocking server in another process, ``--seconds`` per round.

Prints a table of medians over ``--reps`` rounds and the token/file ratios.
Needs SoftHSM2 (``softhsm2-util``) and ``callcp[hsm]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

import callcp
from callcp.hsm import generate_key

OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
PIN = "bench-pin-1"


def make_token(root: Path) -> str:
    """A SoftHSM2 token with one 2048-bit key under ``root``; its URI."""
    tool = shutil.which("softhsm2-util")
    if tool is None:
        sys.exit("hsm_bench: softhsm2-util not found (apt-get install softhsm2)")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        [tool, "--init-token", "--free", "--label", "bench", "--pin", PIN, "--so-pin", PIN],
        check=True,
        capture_output=True,
    )
    pin = root / "pin"
    pin.write_text(PIN)
    pin.chmod(0o600)
    uri = f"pkcs11:token=bench;object=server?module-name=softhsm2&pin-source=file:{pin}"
    generate_key(uri, 2048)
    return uri


def per_op_us(fn: Callable[[], Any], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return (time.perf_counter() - start) / count * 1e6


def _serve(key: str, ready: Any) -> None:
    def echo(conn: callcp.Connection) -> None:
        for message in conn:
            conn.send(message)

    server = callcp.serve(echo, "127.0.0.1", 0, key=key, ticket_lifetime=0, max_handshakes=64)
    ready.send(server.port)
    server.serve_forever()


def handshakes_per_second(key: str, fingerprint: str, seconds: float) -> float:
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    process = ctx.Process(target=_serve, args=(key, theirs), daemon=True)
    process.start()
    try:
        port = mine.recv()
        message = os.urandom(64)
        for _ in range(5):  # warm-up
            with callcp.connect("127.0.0.1", port, server_fingerprint=fingerprint) as conn:
                conn.request(message)
        count, start = 0, time.monotonic()
        while time.monotonic() - start < seconds:
            with callcp.connect("127.0.0.1", port, server_fingerprint=fingerprint) as conn:
                if conn.request(message) != message:
                    raise RuntimeError("the server did not echo")
            count += 1
        return count / (time.monotonic() - start)
    finally:
        process.terminate()
        process.join(10)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--ops", type=int, default=200, help="RSA operations per measurement")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uri = make_token(root)
        key_file = root / "server.pem"
        callcp.KeyPair.generate(2048).save(key_file)
        keys = {"file": str(key_file), "token": uri}
        pairs = {name: callcp.KeyPair.load(source) for name, source in keys.items()}
        results: Dict[str, Dict[str, List[float]]] = {
            name: {"sign": [], "decrypt": [], "handshakes": []} for name in keys
        }
        for rep in range(args.reps):
            for name, pair in pairs.items():
                private = pair.private_key
                ciphertext = pair.public_key.encrypt(os.urandom(32), OAEP)
                results[name]["sign"].append(
                    per_op_us(partial(private.sign, b"share", PSS, hashes.SHA256()), args.ops)
                )
                results[name]["decrypt"].append(
                    per_op_us(partial(private.decrypt, ciphertext, OAEP), args.ops)
                )
                results[name]["handshakes"].append(
                    handshakes_per_second(keys[name], pair.fingerprint, args.seconds)
                )
            print(f"round {rep + 1}/{args.reps} done", file=sys.stderr)
    median = {n: {m: statistics.median(v) for m, v in r.items()} for n, r in results.items()}
    print(f"RSA-2048 server key, medians of {args.reps} rounds (SoftHSM2 vs key file)")
    print(f"{'':28}{'file':>12}{'token':>12}{'token/file':>12}")
    rows = (
        ("RSA-PSS sign, us/op", "sign"),
        ("RSA-OAEP decrypt, us/op", "decrypt"),
        ("full handshakes/s", "handshakes"),
    )
    for label, metric in rows:
        f, t = median["file"][metric], median["token"][metric]
        print(f"{label:28}{f:12.1f}{t:12.1f}{t / f:12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
