"""callcp.Pool: reuse, concurrency, retirement of broken, idle, aged and
gone connections, exhaustion, close; against both server adapters."""

from __future__ import annotations

import threading
import time
from typing import Any, List

import pytest

import callcp
from callcp import CallcpTimeout, LocalProtocolError, Pool
from tests.adapters import Adapter, Echo, Resumed
from tests.sock_support import free_port

LOOPBACK = "127.0.0.1"


def _pool(srv: Any, **kwargs: Any) -> Pool:
    kwargs.setdefault("server_fingerprint", srv.fingerprint)
    kwargs.setdefault("timeout", 10.0)
    return Pool(LOOPBACK, srv.port, **kwargs)


def test_requests_reuse_one_connection_and_new_ones_resume(adapter: Adapter) -> None:
    handler = Resumed()
    srv = adapter.serve(handler)
    with _pool(srv, session_store=callcp.SessionStore()) as pool:
        for i in range(10):
            assert pool.request(b"m%d" % i) == b"m%d" % i
        stats = pool.stats()
        assert (stats.open, stats.idle, stats.in_use, stats.created, stats.failed) == (
            1, 1, 0, 1, 0,
        )  # fmt: skip
        with pool.connection() as first, pool.connection() as second:  # two at once
            assert first.request(b"a") == b"a" and second.request(b"b") == b"b"
        assert pool.stats().created == 2
    assert handler.resumed == [False, True]  # the second connection used a ticket
    assert pool.stats().open == 0


def test_threads_share_a_bounded_pool(adapter: Adapter) -> None:
    srv = adapter.serve(Echo())
    errors: List[BaseException] = []
    with _pool(srv, size=3) as pool:

        def work(n: int) -> None:
            try:
                for i in range(40):
                    message = b"%d-%d" % (n, i)
                    assert pool.request(message) == message
            except BaseException as exc:  # (reported below)
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert 1 <= pool.stats().created <= 3 and pool.stats().in_use == 0


def test_a_connection_that_saw_an_error_is_never_handed_out_again(adapter: Adapter) -> None:
    srv = adapter.serve(Echo())
    with _pool(srv) as pool:
        with pytest.raises(ValueError), pool.connection() as conn:
            conn.send(b"half a conversation")
            raise ValueError("the application failed mid-exchange")
        assert conn.closed
        assert pool.stats().failed == 1 and pool.stats().open == 0
        assert pool.request(b"again") == b"again"  # a new connection
        assert pool.stats().created == 2


def test_idle_and_old_connections_are_retired(adapter: Adapter) -> None:
    srv = adapter.serve(Echo())
    with _pool(srv, max_idle=0.05) as pool:
        assert pool.request(b"1") == b"1"
        time.sleep(0.15)  # (older than max_idle)
        assert pool.request(b"2") == b"2"
        assert pool.stats().created == 2 and pool.stats().open == 1
    with _pool(srv, max_lifetime=0.05) as pool:
        assert pool.request(b"1") == b"1"
        time.sleep(0.15)
        assert pool.request(b"2") == b"2"
        assert pool.stats().created == 2


def test_a_server_restart_is_seen_before_a_connection_is_handed_out(
    adapter: Adapter,
) -> None:
    """The idle connection got the server's GOING_AWAY while it waited:
    poll() sees it, and the pool connects to the restarted server."""
    port = free_port()
    first = adapter.serve(Echo(), port=port)
    with _pool(first) as pool:
        assert pool.request(b"before") == b"before"
        first.shutdown()
        adapter.serve(Echo(), port=port)
        assert pool.request(b"after") == b"after"
        assert pool.stats().created == 2


def test_an_exhausted_pool_times_out_and_a_closed_one_refuses(adapter: Adapter) -> None:
    srv = adapter.serve(Echo())
    pool = _pool(srv, size=1, timeout=0.3)
    with pool.connection() as held:
        assert held.request(b"x") == b"x"
        with pytest.raises(CallcpTimeout, match="all 1 in use"):
            pool.request(b"y")
    assert not held.closed and pool.stats().idle == 1  # (back in the pool)
    pool.close()
    assert held.closed  # idle connections are closed by close()
    with pytest.raises(LocalProtocolError, match="closed"):
        pool.request(b"z")
    with pytest.raises(ValueError, match="size"):
        Pool(LOOPBACK, srv.port, size=0)


def test_an_idle_connection_answers_the_servers_pings_at_checkout(adapter: Adapter) -> None:
    """A server with keepalive pings the idle pooled connection; poll()
    answers at checkout and the connection is reused, not replaced."""
    srv = adapter.serve(Echo(), keepalive_interval=0.1, keepalive_timeout=5.0)
    with _pool(srv) as pool:
        assert pool.request(b"1") == b"1"
        time.sleep(0.4)  # (the server pings meanwhile)
        assert pool.request(b"2") == b"2"
        assert pool.stats().created == 1


# ------------------------------------------------------------ callcp.aio.Pool


def test_asyncio_pool(adapter: Adapter) -> None:
    """callcp.aio.Pool: reuse and resumption, tasks sharing a bounded pool,
    retirement after an error, a server restart seen at checkout,
    exhaustion, close."""
    import asyncio

    import callcp.aio

    handler = Resumed()
    port = free_port()
    first = adapter.serve(handler, port=port)

    async def main() -> None:
        pool = callcp.aio.Pool(
            LOOPBACK, port, size=3, timeout=10.0, server_fingerprint=first.fingerprint,
            session_store=callcp.SessionStore(),
        )  # fmt: skip
        for i in range(5):
            assert await pool.request(b"m%d" % i) == b"m%d" % i
        assert pool.stats().created == 1

        async def work(n: int) -> None:
            for i in range(30):
                message = b"%d-%d" % (n, i)
                assert await pool.request(message) == message

        await asyncio.gather(*(work(n) for n in range(8)))
        assert 1 < pool.stats().created <= 3 and pool.stats().in_use == 0
        # (connections opened at once share the tickets there are: one here)
        assert handler.resumed[0] is False and any(handler.resumed[1:])

        failed = pool.stats().failed
        with pytest.raises(ValueError):
            async with pool.connection() as conn:
                raise ValueError("the application failed")
        assert conn.closed and pool.stats().failed == failed + 1

        first.shutdown()  # idle connections get GOING_AWAY
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: adapter.serve(Resumed(), port=port)
        )
        assert await pool.request(b"after") == b"after"

        small = callcp.aio.Pool(
            LOOPBACK, port, size=1, timeout=0.3, server_fingerprint=first.fingerprint
        )
        async with small.connection() as held:
            with pytest.raises(CallcpTimeout, match="all 1 in use"):
                await small.request(b"y")
        await small.close()
        assert held.closed
        with pytest.raises(LocalProtocolError, match="closed"):
            await small.request(b"z")
        await pool.close()
        assert pool.stats().open == 0

    asyncio.run(main())
