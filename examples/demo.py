"""callcp demo: a server and a client exchanging messages on 127.0.0.1.

Run it with `make demo` (or `python examples/demo.py` once callcp is installed).
The server key lives in a temporary directory and the client pins its
fingerprint, so the demo touches nothing in your home directory.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import threading
from pathlib import Path

import callcp


def shout(conn: callcp.Connection) -> None:
    """The server's handler: answer every message in upper case."""
    for message in conn:
        conn.send(message.upper())


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="  [log] %(name)s: %(message)s", stream=sys.stdout
    )
    with tempfile.TemporaryDirectory() as tmp:
        key = callcp.KeyPair.load_or_generate(Path(tmp) / "server_key.pem")
        print(f"server key fingerprint: {key.fingerprint}")
        with callcp.serve(shout, "127.0.0.1", 0, key=key) as server:
            threading.Thread(target=server.serve_forever, daemon=True).start()
            print(f"server listening on 127.0.0.1:{server.port}")
            with callcp.connect(
                "127.0.0.1", server.port, server_fingerprint=key.fingerprint
            ) as conn:
                conn.do_handshake(confirm=True)  # wait for the server to prove its key
                print(f"client connected; server key verified: {conn.peer_fingerprint}")
                for text in (b"hello, callcp", b"messages keep their boundaries", b""):
                    reply = conn.request(text)
                    print(f"client sent {text!r:40} got {reply!r}")
                big = bytes(range(256)) * 4096  # 1 MiB
                assert conn.request(big) == big.upper()
                print("client sent 1 MiB in one message and got it back intact")
        print("server shut down cleanly")


if __name__ == "__main__":
    main()
