"""Callcp 1.0 entry point: ``python Client.py HOST PORT "message"`` or
``from Client import SecureTCPClient``.

Works from a checkout without installing callcp: ``src/`` is put on the path.
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
        print(f"Server response: {response.decode('utf-8', errors='replace')}")
    except SecureTCPClientError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
