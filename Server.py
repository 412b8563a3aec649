"""Callcp 1.0 entry point: ``python Server.py`` or ``from Server import SecureTCPServer``.

Serves on 0.0.0.0:8436 with an echo handler, keys ``server_private.pem`` /
``server_public.pem`` in the working directory (generated on first run): run
it from the same directory each time, or it presents another key and clients
that trusted the first one refuse it.  Works from a checkout without
installing callcp: ``src/`` is put on the path.

Exit code 0 after Ctrl-C, 1 if the server cannot start.  The library has
already reported the error, once (the display's error line, or a log line),
so it is not printed again here.
"""

from __future__ import annotations

import importlib.util
import os
import sys

if importlib.util.find_spec("callcp") is None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from callcp import (  # noqa: E402
    CryptoError,
    HandshakeError,
    KeyManagementError,
    SecureTCPServerError,
    TransportError,
)
from callcp.compat import SecureTCPServer  # noqa: E402

__all__ = [
    "SecureTCPServer",
    "SecureTCPServerError",
    "KeyManagementError",
    "HandshakeError",
    "TransportError",
    "CryptoError",
]


def main() -> int:
    server = SecureTCPServer(host="0.0.0.0", port=8436, use_display=True)  # noqa: S104
    try:
        server.initialize()
        server.start()
    except SecureTCPServerError:
        return 1  # initialize() and start() have reported it (display or log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
