"""Callcp 1.0 entry point: ``python Server.py`` or ``from Server import SecureTCPServer``.

Serves on 0.0.0.0:8436 with an echo handler, keys ``server_private.pem`` /
``server_public.pem`` in the working directory (generated on first run).
Works from a checkout without installing callcp: ``src/`` is put on the path.
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
    except SecureTCPServerError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
