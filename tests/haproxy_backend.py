"""One callcp server process behind HAProxy (tests/test_haproxy.py).

``python -m tests.haproxy_backend NAME PORT KEY TICKET_KEY TRUSTED_PROXY [LEVEL]``:
the server key and the ticket key file are the ones every backend shares;
connections from TRUSTED_PROXY must begin with a PROXY header.  It answers
``whoami`` with ``NAME HOST:PORT RESUMED`` (the client as it sees it, and
whether its session was resumed) and echoes anything else; it logs to
stderr; it prints ``listening PORT`` once it accepts.  SIGTERM: a graceful
shutdown."""

from __future__ import annotations

import logging
import sys

import callcp


def main() -> None:
    name, port, key, tickets, trusted = sys.argv[1:6]
    level = sys.argv[6] if len(sys.argv) > 6 else "DEBUG"
    logging.basicConfig(
        level=getattr(logging, level), stream=sys.stderr, format=f"{name} %(levelname)s %(message)s"
    )

    def handler(conn: callcp.Connection) -> None:
        for message in conn:
            if message == b"whoami":
                host, cport = conn.remote_address[:2]
                conn.send(f"{name} {host}:{cport} {int(conn.resumed)}".encode())
            else:
                conn.send(message)

    server = callcp.serve(
        handler,
        "127.0.0.1",
        int(port),
        key=key,
        ticket_key=tickets,
        proxy_protocol=True,
        trusted_proxies=[trusted],
        reuse_port=False,
    )
    print("listening", server.port, flush=True)
    server.serve_forever(handle_signals=True)


if __name__ == "__main__":
    main()
