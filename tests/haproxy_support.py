"""A real HAProxy in front of callcp server processes, for tests/test_haproxy.py
and benchmarks/haproxy_bench.py.

:class:`Cluster` writes an HAProxy configuration (the one
docs/guides/deployment.md gives, with local addresses: ``mode tcp``,
``send-proxy-v2``, a ``tcp-check`` expecting the ServerHello's magic) and
starts HAProxy in front of N :class:`Backend` processes
(tests/haproxy_backend.py), all with the same server key and ticket key
file.  HAProxy connects to the backends from 127.0.0.2, their one trusted
proxy; clients connect to it from 127.0.0.1."""

from __future__ import annotations

import select
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

from cryptography.hazmat.primitives.asymmetric import rsa

import callcp
import callcp.cli
from tests.sock_support import wait_until

REPO = Path(__file__).resolve().parents[1]
PROXY_SOURCE = "127.0.0.2"  # (HAProxy's address toward the backends: their trusted proxy)
CONFIG = """\
global
    stats socket {dir}/admin.sock mode 600 level admin
    maxconn 2000

defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 2s
    retries 3
    option redispatch 1

frontend callcp
    bind 127.0.0.1:{port}
    default_backend callcp_servers

backend callcp_servers
    balance {balance}
    source {source}
    option tcp-check
    tcp-check connect default
    tcp-check expect binary 43414c4c4350
    default-server check inter 200ms fall 2 rise 2 send-proxy-v2 check-send-proxy
{servers}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Backend:
    """tests/haproxy_backend.py in a process of its own."""

    def __init__(
        self, name: str, directory: Path, key: Path, tickets: Path, log: Optional[str] = None
    ) -> None:
        self.name, self.dir, self.key, self.tickets = name, directory, key, tickets
        self.level = log or "DEBUG"
        self.port = 0
        self.log = directory / f"{name}.log"
        self.proc: subprocess.Popen[bytes]
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.haproxy_backend",
                    self.name,
                    str(self.port),
                    str(self.key),
                    str(self.tickets),
                    PROXY_SOURCE,
                ],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        assert ready, f"{self.name} did not start within 30 s: {self.log.read_text()}"
        line = self.proc.stdout.readline().decode()
        assert line.startswith("listening "), (line, self.log.read_text())
        self.port = int(line.split()[1])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def logged(self) -> str:
        return self.log.read_text(errors="replace")


class Cluster:
    def __init__(
        self,
        directory: Path,
        key: rsa.RSAPrivateKey,
        n: int = 3,
        balance: str = "roundrobin",
        log: Optional[str] = None,
    ) -> None:
        haproxy = shutil.which("haproxy")
        assert haproxy, "HAProxy is missing: run scripts/system-deps.sh (apt-get install haproxy)"
        self.dir = directory
        keypair = callcp.KeyPair(key)
        keypair.save(directory / "server.pem")
        self.fingerprint = keypair.fingerprint
        tickets = directory / "tickets"
        assert callcp.cli.main(["keygen", "--ticket-key", str(tickets), "-q"]) == 0
        self.backends = [
            Backend(f"b{i + 1}", directory, directory / "server.pem", tickets, log)
            for i in range(n)
        ]
        self.port = free_port()
        servers = "\n".join(f"    server {b.name} 127.0.0.1:{b.port}" for b in self.backends)
        config = directory / "haproxy.cfg"
        config.write_text(
            CONFIG.format(
                dir=directory, port=self.port, source=PROXY_SOURCE, servers=servers, balance=balance
            )
        )
        self.haproxy = subprocess.Popen(
            [haproxy, "-f", str(config), "-db"],
            stdout=subprocess.DEVNULL,
            stderr=open(directory / "haproxy.log", "wb"),  # noqa: SIM115 - closed with the process
        )
        assert wait_until(lambda: all(self.states().get(b.name) == 2 for b in self.backends), 15), (
            directory / "haproxy.log"
        ).read_text()

    def states(self) -> Dict[str, int]:
        """Each server's operational state as HAProxy sees it (2: up, 0: down)."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                sock.connect(str(self.dir / "admin.sock"))
                sock.sendall(b"show servers state callcp_servers\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError:
            return {}
        states = {}
        for line in data.decode().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "callcp_servers":
                states[fields[3]] = int(fields[5])
        return states

    def connect(self, **options: object) -> callcp.Connection:
        return callcp.connect(
            "127.0.0.1", self.port, server_fingerprint=self.fingerprint, timeout=10, **options
        )

    def close(self) -> None:
        self.haproxy.terminate()
        try:
            self.haproxy.wait(10)
        except subprocess.TimeoutExpired:
            self.haproxy.kill()
        for backend in self.backends:
            backend.stop()
