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

import socket
import threading
from typing import Iterator, List

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

import callcp
from tests.haproxy_support import PROXY_SOURCE, Cluster
from tests.sock_support import wait_until


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


def test_the_haproxy_benchmark_runs() -> None:
    """benchmarks/haproxy_bench.py (its figures are in the deployment guide), tiny."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "haproxy_bench.py"
    done = subprocess.run(
        [sys.executable, str(script), "--reps", "1", "--seconds", "0.2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = {line[:44].strip(): line[44:].split() for line in done.stdout.splitlines()[2:]}
    assert len(rows) == 8, done.stdout
    assert all(float(values[0]) > 0 for values in rows.values()), done.stdout
