"""callcp behind a real HAProxy: 1 backend against 3, and resumption.

    python benchmarks/haproxy_bench.py [--reps 5] [--seconds 3]

Starts HAProxy (``haproxy`` must be installed) in front of 1, then 3,
callcp server processes sharing one key and one ticket key file (the
configuration of docs/guides/deployment.md, tests/haproxy_support.py), and
measures in every round, the two alternating:

- messages/s: 8 blocking client connections through HAProxy, one thread
  each, 1 KiB requests and replies (request/response), ``--seconds``;
- handshakes/s through HAProxy: connect, one 64-byte request, close, in a
  loop, with session tickets (a shared session store: resumed on whichever
  backend) and without (full handshakes), and the share that resumed.

Prints medians over ``--reps`` rounds.  The machine's cores are shared by
the client, HAProxy and the backends: on 2 cores, 3 backends cannot do
much better than 1 (the figures are for the record, not a scaling claim).
Run from a source checkout (it uses the tests' HAProxy harness).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from tests.haproxy_support import Cluster  # noqa: E402

import callcp  # noqa: E402

PAYLOAD = b"x" * 1024
CONNECTIONS = 8


def messages_per_second(cluster: Cluster, seconds: float) -> float:
    conns = [cluster.connect(session_store=None) for _ in range(CONNECTIONS)]
    counts = [0] * CONNECTIONS
    stop = threading.Event()

    def run(i: int) -> None:
        conn = conns[i]
        while not stop.is_set():
            conn.request(PAYLOAD)
            counts[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CONNECTIONS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    for conn in conns:
        conn.close()
    return sum(counts) / elapsed


def handshakes_per_second(cluster: Cluster, seconds: float, tickets: bool) -> Tuple[float, float]:
    """(handshakes/s, share resumed)."""
    store = callcp.SessionStore() if tickets else None
    done = resumed = 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        with cluster.connect(session_store=store) as conn:
            reply = conn.request(b"whoami")
        done += 1
        resumed += reply.endswith(b" 1")
    return done / (time.perf_counter() - started), resumed / max(done, 1)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    results: Dict[str, List[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        clusters: Dict[int, Cluster] = {}
        for n in (1, 3):
            directory = Path(tmp) / f"{n}-backends"
            directory.mkdir()
            clusters[n] = Cluster(directory, key, n=n, balance="leastconn", log="WARNING")
        try:
            for _ in range(args.reps):
                for n, cluster in clusters.items():
                    rate = messages_per_second(cluster, args.seconds)
                    results.setdefault(f"{n} backend(s): messages/s", []).append(rate)
                    rate, share = handshakes_per_second(cluster, args.seconds, True)
                    results.setdefault(f"{n} backend(s): handshakes/s, tickets", []).append(rate)
                    results.setdefault(f"{n} backend(s): share resumed", []).append(share)
                    rate, _ = handshakes_per_second(cluster, args.seconds, False)
                    results.setdefault(f"{n} backend(s): handshakes/s, full", []).append(rate)
        finally:
            for cluster in clusters.values():
                cluster.close()
    print(f"medians of {args.reps} rounds of {args.seconds} s, through HAProxy")
    print(f"{'':44}{'median':>10}   rounds")
    for name, values in results.items():
        fmt = ".2f" if max(values) < 2 else ".0f"  # (a share, or a rate)
        shown = " ".join(format(v, fmt) for v in values)
        print(f"{name:44}{format(statistics.median(values), fmt):>10}   {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
