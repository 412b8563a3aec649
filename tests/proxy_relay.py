"""A TCP relay that plays a load balancer for PROXY protocol tests: it
listens on 127.0.0.1:0 and, for each client, connects to ``target`` from
``source`` (a local address to bind: 127.0.0.1 is the tests' trusted proxy,
127.0.0.2 a stranger), writes ``header(client_address)`` first (None: no
header), then relays both ways until either side ends.  (The real thing,
HAProxy, is tests/test_haproxy.py's.)"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
from typing import Callable, List, Optional, Tuple

Address = Tuple[str, int]
HeaderFn = Callable[[Address], Optional[bytes]]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _dest(client: Address) -> Address:
    """The proxy's own address, in the client's family."""
    return ("2001:db8::1", 8436) if ":" in client[0] else ("10.0.0.1", 8436)


def v1(client: Address) -> bytes:
    family = "TCP6" if ":" in client[0] else "TCP4"
    dest = _dest(client)
    return f"PROXY {family} {client[0]} {dest[0]} {client[1]} {dest[1]}\r\n".encode()


def v2(client: Address, *, local: bool = False) -> bytes:
    if local:
        return V2_SIGNATURE + struct.pack(">BBH", 0x20, 0x00, 0)
    ip = ipaddress.ip_address(client[0])
    fam = 0x11 if ip.version == 4 else 0x21
    dest = _dest(client)
    body = ip.packed + ipaddress.ip_address(dest[0]).packed + struct.pack(">HH", client[1], dest[1])
    return V2_SIGNATURE + struct.pack(">BBH", 0x21, fam, len(body)) + body


class HeaderRelay:
    def __init__(self, target: Address, header: HeaderFn, source: str = "127.0.0.1") -> None:
        self.target = target
        self.header = header
        self.source = source
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._socks: List[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        port: int = self._listener.getsockname()[1]
        return port

    def _accept(self) -> None:
        while True:
            try:
                client, addr = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, source_address=(self.source, 0))
                header = self.header(addr)
                if header:
                    upstream.sendall(header)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._socks:
                sock.close()
