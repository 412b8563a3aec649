"""For the documentation's snippets (tests/snippet_runner.py): the host name
``server.example``, with any port, reaches the echo server whose port is in
``$CALLCP_SNIPPET_SERVER``, in every Python process the snippets start."""

import os
import socket

_real_getaddrinfo = socket.getaddrinfo


def _getaddrinfo(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
    target = os.environ.get("CALLCP_SNIPPET_SERVER")
    if target and host in ("server.example", b"server.example"):
        return _real_getaddrinfo("127.0.0.1", int(target), *args, **kwargs)
    return _real_getaddrinfo(host, port, *args, **kwargs)


socket.getaddrinfo = _getaddrinfo
