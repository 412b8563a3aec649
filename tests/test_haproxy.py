"""Three callcp server processes behind a real HAProxy (issue 13's must-show).

HAProxy (Debian's package; scripts/system-deps.sh installs it) runs with a
configuration written here, as docs/guides/deployment.md gives it: ``mode
tcp``, ``send-proxy-v2``, a ``tcp-check`` that expects the ServerHello's
magic, round-robin.  It connects to the backends from 127.0.0.2, their one
trusted proxy; clients connect to it from 127.0.0.1, so a backend that
names 127.0.0.2 names the proxy, not the client.  Each backend is
tests/haproxy_backend.py in its own process: the same server key and the
same ticket key file."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

import callcp
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
    retries 3
    option redispatch 1

frontend callcp
    bind 127.0.0.1:{port}
    default_backend callcp_servers

backend callcp_servers
    balance roundrobin
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

    def __init__(self, name: str, directory: Path, key: Path, tickets: Path) -> None:
        self.name, self.dir, self.key, self.tickets = name, directory, key, tickets
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
    def __init__(self, directory: Path, key: rsa.RSAPrivateKey, n: int = 3) -> None:
        haproxy = shutil.which("haproxy")
        assert haproxy, "HAProxy is missing: run scripts/system-deps.sh (apt-get install haproxy)"
        self.dir = directory
        keypair = callcp.KeyPair(key)
        keypair.save(directory / "server.pem")
        self.fingerprint = keypair.fingerprint
        tickets = directory / "tickets"
        assert callcp.cli.main(["keygen", "--ticket-key", str(tickets), "-q"]) == 0
        self.backends = [
            Backend(f"b{i + 1}", directory, directory / "server.pem", tickets) for i in range(n)
        ]
        self.port = free_port()
        servers = "\n".join(f"    server {b.name} 127.0.0.1:{b.port}" for b in self.backends)
        config = directory / "haproxy.cfg"
        config.write_text(
            CONFIG.format(dir=directory, port=self.port, source=PROXY_SOURCE, servers=servers)
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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    made = Cluster(tmp_path_factory.mktemp("haproxy"), key)
    yield made
    made.close()


def whoami(conn: callcp.Connection) -> List[str]:
    return conn.request(b"whoami").decode().split()


def test_every_backend_sees_and_logs_the_clients_real_address(cluster: Cluster) -> None:
    names = set()
    for _ in range(9):
        with cluster.connect() as conn:
            name, seen, _ = whoami(conn)
            names.add(name)
            assert seen == f"127.0.0.1:{conn.local_address[1]}"  # the client, not 127.0.0.2
    assert names == {"b1", "b2", "b3"}
    for backend in cluster.backends:
        log = backend.logged()
        assert "connection from 127.0.0.1:" in log
        assert f"connection from {PROXY_SOURCE}" not in log
        assert "WARNING" not in log  # (health checks every 200 ms included)


def test_reconnections_resume_on_whichever_backend_they_land(cluster: Cluster) -> None:
    store = callcp.SessionStore()
    with cluster.connect(session_store=store) as conn:
        assert whoami(conn)[2] == "0"  # (the first contact: a full handshake)
    landed, resumed = set(), 0
    total = 60
    for _ in range(total):
        with cluster.connect(session_store=store) as conn:
            name, _, was_resumed = whoami(conn)
            landed.add(name)
            resumed += was_resumed == "1"
    share = resumed / total
    print(f"resumed {resumed}/{total} reconnections through HAProxy ({share:.0%})")
    assert landed == {"b1", "b2", "b3"}
    assert share >= 0.9


def test_a_proxy_header_sent_directly_by_an_untrusted_client_is_refused(cluster: Cluster) -> None:
    backend = cluster.backends[0]
    with socket.create_connection(("127.0.0.1", backend.port), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 198.51.100.7 10.0.0.1 4242 8436\r\n")
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        assert received.startswith(b"\x01")  # (its ServerHello, then an ALERT, then the end)
    assert wait_until(
        lambda: (
            "PROXY protocol header from an address that is not a trusted proxy" in backend.logged()
        )
    )
    with callcp.connect(  # (a direct client from there, without a header: served as itself)
        "127.0.0.1", backend.port, server_fingerprint=cluster.fingerprint
    ) as conn:
        assert whoami(conn)[1] == f"127.0.0.1:{conn.local_address[1]}"


def test_a_pool_rides_out_a_backend_killed_and_restarted(cluster: Cluster) -> None:
    """8 pooled connections keep making idempotent requests while b2 is
    SIGKILLed and later restarted: every request succeeds (retries), the
    health check takes b2 out and puts it back, and b2 serves again."""
    pool = callcp.Pool(
        "127.0.0.1",
        cluster.port,
        size=8,
        max_lifetime=1.0,  # (connections are renewed: they spread again once b2 is back)
        server_fingerprint=cluster.fingerprint,
        timeout=10,
        retry=callcp.Retry(attempts=10, backoff=0.05, max_backoff=0.5),
    )
    stop = threading.Event()
    errors: List[BaseException] = []
    served: List[str] = []
    lock = threading.Lock()

    def work() -> None:
        while not stop.is_set():
            try:
                name = pool.request(b"whoami", idempotent=True).split()[0].decode()
            except BaseException as exc:  # noqa: BLE001 - counted: there must be none
                with lock:
                    errors.append(exc)
                return
            with lock:
                served.append(name)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    victim = cluster.backends[1]
    try:
        assert wait_until(lambda: served.count(victim.name) > 10, 10)
        victim.kill()
        assert wait_until(lambda: cluster.states().get(victim.name) == 0, 10)
        before = len(served)
        assert wait_until(lambda: len(served) > before + 200, 20)
        after_kill = len(served)
        victim.start()  # (the same port)
        assert wait_until(lambda: cluster.states().get(victim.name) == 2, 10)
        assert wait_until(lambda: served[after_kill:].count(victim.name) > 0, 20)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        pool.close()
    assert errors == []
    print(f"{len(served)} pooled requests, none failed; {pool.stats()}")
