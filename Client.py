"""Callcp 1.0 entry point: ``python Client.py HOST PORT "message"`` or
``from Client import SecureTCPClient``.

Prints ``Server response: <reply>``, the reply decoded as UTF-8 (invalid
bytes replaced) with every control character escaped (ESC, CR, BEL, C1
controls, line breaks: ``\\x1b``, ``\\r``...): the reply is the server's
text, and a hostile server must not send the terminal escape sequences
(window title, clipboard writes, screen clearing) or forge lines.  There is
no raw mode: every argument after PORT is part of the message, as in Callcp
1.0; ``callcp send --raw HOST PORT MESSAGE`` writes a reply's bytes as they are.

Exit code 0 on success, 1 on a usage error or a failure.  Failures are
reported once by the library (the display's error line, or a log line), so
they are not printed again here.  Works from a checkout without installing
callcp: ``src/`` is put on the path.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

if importlib.util.find_spec("callcp") is None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from callcp import (  # noqa: E402
    CryptoError,
    HandshakeError,
    SecureTCPClientError,
    TransportError,
)
from callcp.compat import SecureTCPClient  # noqa: E402
from callcp.display import printable  # noqa: E402

__all__ = [
    "SecureTCPClient",
    "SecureTCPClientError",
    "HandshakeError",
    "TransportError",
    "CryptoError",
]

USAGE = 'Usage: python Client.py HOST PORT "message"'


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3:
        print(USAGE, file=sys.stderr)
        return 1
    host, port_text, message = args[0], args[1], " ".join(args[2:])
    port = int(port_text) if port_text.isdigit() else -1
    if not 0 < port < 65536:
        print(f"Error: invalid port {port_text!r} (1-65535)", file=sys.stderr)
        return 1
    client = SecureTCPClient(host=host, port=port, use_display=True)
    try:
        client.connect()
        response = client.send_message(message.encode("utf-8"))
    except SecureTCPClientError:
        return 1  # connect() and send_message() have reported it (display or log)
    finally:
        client.disconnect()
    print(f"Server response: {printable(response.decode('utf-8', errors='replace'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
