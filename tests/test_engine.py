"""The connection engine's pieces, without sockets: options, admission, the
key-exchange queue, the message budget, rate-limited notices, the handler
policy.  (Over real sockets they are exercised by test_hostile_load.py.)"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, List

import pytest

import callcp
from callcp import ClientOptions, ServerOptions
from callcp._core.errors import (
    CallcpTimeout,
    CloseCode,
    ConnectionClosedOK,
    HandshakeError,
    MessageTooLarge,
)
from callcp._engine import (
    Admission,
    Engine,
    HandshakeQueue,
    HandshakeTicket,
    MessageBudget,
    Notices,
    handler_outcome,
    source_of,
)
from callcp._options import ClientKwargs, ServerKwargs, default_max_connections

# ------------------------------------------------------------------ options


def test_kwargs_match_the_option_classes() -> None:
    """connect()/serve() take exactly the options' fields (written twice: once
    as the dataclass, once as the TypedDict that types ``**options``)."""
    assert set(ClientKwargs.__annotations__) == {f.name for f in dataclasses.fields(ClientOptions)}
    assert set(ServerKwargs.__annotations__) == {f.name for f in dataclasses.fields(ServerOptions)}


def test_one_source_of_defaults() -> None:
    server = ServerOptions()
    assert server.max_connections == default_max_connections()
    assert server.max_handshakes == 16 and server.handshake_timeout == 10.0
    assert server.max_connections_per_source == 512 and server.max_handshakes_per_source == 64
    assert server.max_buffered_bytes == 256 * 1024 * 1024
    assert ClientOptions().timeout == 30.0


@pytest.mark.parametrize(
    ("cls", "option", "value"),
    [
        (ServerOptions, "max_connections", 0),
        (ServerOptions, "max_connections_per_source", -1),
        (ServerOptions, "max_handshakes", 0),
        (ServerOptions, "handshake_timeout", 0),
        (ServerOptions, "handshake_timeout", None),
        (ServerOptions, "idle_timeout", float("nan")),
        (ServerOptions, "max_message_size", -1),
        (ServerOptions, "max_buffered_bytes", 0),
        (ServerOptions, "workers", True),
        (ServerOptions, "logger", "callcp"),
        (ClientOptions, "timeout", -1),
        (ClientOptions, "max_message_size", "big"),
    ],
)
def test_invalid_options_name_themselves(cls: Any, option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option):
        cls(**{option: value})


def test_contradictory_client_options() -> None:
    with pytest.raises(ValueError, match="insecure"):
        ClientOptions(insecure=True, server_fingerprint="SHA256:" + "A" * 43)


def test_misspelt_option_is_refused_at_run_time() -> None:
    with pytest.raises(TypeError, match="max_conections"):
        callcp.serve(lambda conn: None, "127.0.0.1", 0, max_conections=3)  # type: ignore[call-arg]


def test_the_budget_always_fits_one_message() -> None:
    options = ServerOptions(max_message_size=300 << 20, max_buffered_bytes=1 << 20)
    assert options.max_buffered_bytes == 300 << 20


def test_default_max_connections_stays_below_the_descriptor_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert 0 < default_max_connections() <= soft - 64


def test_mypy_rejects_a_misspelt_option(tmp_path: Path) -> None:
    """``serve(..., max_conections=3)`` is a type error under mypy --strict
    (and a misspelt option of a pool too)."""
    snippet = tmp_path / "snippet.py"
    snippet.write_text(
        textwrap.dedent(
            """
            import callcp

            def handler(conn: callcp.Connection) -> None:
                pass

            callcp.serve(handler, "127.0.0.1", 0, max_connections=3)
            callcp.serve(handler, "127.0.0.1", 0, max_conections=3)
            callcp.Pool("127.0.0.1", 1, size=2, keepalive_interval=5.0)
            callcp.aio.Pool("127.0.0.1", 1, size=2, keepalive_intreval=5.0)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(snippet)],
        capture_output=True,
        text=True,
        check=False,
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2, result.stdout
    assert "snippet.py:8:" in errors[0] and "max_conections" in errors[0], errors
    assert "snippet.py:10:" in errors[1] and "keepalive_intreval" in errors[1], errors


# ---------------------------------------------------------------- admission


def test_sources() -> None:
    assert source_of(("192.0.2.7", 1)) == "192.0.2.7"
    assert source_of(("::ffff:192.0.2.7", 1, 0, 0)) == "192.0.2.7"
    assert source_of(("2001:db8:1:2:3:4:5:6", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert source_of(("2001:db8:1:2:ffff::1", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert source_of(()) == "local"


def test_admission_per_source_and_global() -> None:
    admission = Admission(max_connections=20, per_source=5)
    assert all(admission.admit("a") is None for _ in range(5))
    assert "max_connections_per_source (5)" in str(admission.admit("a"))
    admission.release("a")
    assert admission.admit("a") is None


def test_admission_keeps_the_last_places_for_other_sources() -> None:
    admission = Admission(max_connections=20, per_source=0)
    admitted = 0
    while admission.admit("hog") is None:
        admitted += 1
    assert admitted == 18  # the last tenth (2) is kept
    assert admission.admit("newcomer") is None
    assert admission.admit("another") is None
    assert "max_connections (20)" in str(admission.admit("third"))


def _tickets(queue: HandshakeQueue, started: List[str], *names: str, source: str = "s") -> Any:
    out = []
    for name in names:
        ticket = HandshakeTicket(source, lambda name=name: started.append(name), lambda: True)
        out.append((ticket, queue.submit(ticket)))
    return out


def test_handshake_queue_order_bounds_and_cancel() -> None:
    started: List[str] = []
    queue = HandshakeQueue(limit=2, max_waiting=2, per_source=0)
    (a, _), (b, _), (c, _), (d, _), (e, refused) = _tickets(queue, started, *"abcde")
    assert started == ["a", "b"] and queue.waiting == 2
    assert refused is not None and "max_handshakes=2" in refused
    assert queue.cancel(c) is True and queue.cancel(a) is False  # a is running
    queue.done(a)
    assert started == ["a", "b", "d"]  # c was cancelled: skipped, no work for it
    queue.done(a)  # twice: no effect
    assert queue.running == 2


def test_handshake_queue_skips_connections_that_are_gone() -> None:
    started: List[str] = []
    queue = HandshakeQueue(limit=1, max_waiting=5, per_source=0)
    first = HandshakeTicket("s", lambda: started.append("a"), lambda: True)
    queue.submit(first)
    queue.submit(HandshakeTicket("s", lambda: started.append("gone"), lambda: False))
    queue.submit(HandshakeTicket("s", lambda: started.append("c"), lambda: True))
    queue.done(first)
    assert started == ["a", "c"] and queue.waiting == 0


def test_handshake_queue_per_source() -> None:
    started: List[str] = []
    queue = HandshakeQueue(limit=10, max_waiting=10, per_source=2)
    results = _tickets(queue, started, "a", "b", "c", source="x")
    assert [why is None for _, why in results] == [True, True, False]
    assert "max_handshakes_per_source (2)" in str(results[2][1])
    assert _tickets(queue, started, "d", source="y")[0][1] is None


class _FakeCore:
    def __init__(self) -> None:
        self.failed: List[BaseException] = []

    def fail(self, exc: BaseException) -> None:
        self.failed.append(exc)


def _engine(budget: MessageBudget) -> Engine:
    return Engine(_FakeCore(), budget=budget)  # type: ignore[arg-type]


def test_message_budget_evicts_the_largest_unfinished_message() -> None:
    budget = MessageBudget(limit=100)
    small, large, me = _engine(budget), _engine(budget), _engine(budget)
    woken: List[str] = []
    large.wake = lambda: woken.append("large")
    budget.charge(small, 20)
    budget.charge(large, 60)
    budget.charge(me, 15)
    assert budget.total == 95 and not woken
    budget.charge(me, 30)  # over: the largest (another connection) goes
    assert woken == ["large"] and isinstance(large.interruption, MessageTooLarge)
    assert budget.total == 50
    budget.charge(small, 0)
    assert budget.total == 30


def test_message_budget_evicts_the_caller_when_it_is_the_largest() -> None:
    budget = MessageBudget(limit=100)
    other, me = _engine(budget), _engine(budget)
    budget.charge(other, 10)
    with pytest.raises(MessageTooLarge):
        budget.charge(me, 95)
    assert budget.total == 10


# ------------------------------------------------------------------ logging


def test_notices_log_a_burst_then_a_summary(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("callcp.test.notices")
    notices = Notices(log)
    with caplog.at_level(logging.WARNING, logger=log.name):
        for i in range(600):
            notices.note("refused connections: busy", f"10.0.0.{i % 3}", "refused %s", i)
        notices.flush(float("inf"))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[: Notices.BURST] == [f"refused {i}" for i in range(Notices.BURST)]
    assert len(lines) == Notices.BURST + 1
    assert lines[-1].startswith("refused connections: busy: 600 in the last")
    assert "from 3 sources" in lines[-1] and "590 not logged one by one" in lines[-1]


# ---------------------------------------------------------------- handlers


@pytest.mark.parametrize(
    ("exc", "code", "logged", "traceback"),
    [
        (None, CloseCode.NORMAL, False, False),
        (ConnectionClosedOK("bye"), CloseCode.NORMAL, False, False),
        (CallcpTimeout("slow"), CloseCode.TIMEOUT, True, False),
        (HandshakeError("bad"), CloseCode.NORMAL, True, False),
        (ValueError("bug"), CloseCode.INTERNAL_ERROR, True, True),
        (KeyboardInterrupt(), CloseCode.GOING_AWAY, False, False),
    ],
)
def test_handler_outcome_is_one_policy(exc: Any, code: int, logged: bool, traceback: bool) -> None:
    outcome = handler_outcome(exc, 300.0)
    assert outcome.close_code == code
    assert (outcome.log_kind is not None or outcome.traceback) == logged
    assert outcome.traceback == traceback


def test_message_budget_evicts_from_the_source_holding_the_most() -> None:
    """Many mid-sized messages from one source cannot make another source's
    single (larger) upload the victim."""
    budget = MessageBudget(limit=100)
    legit = _engine(budget)
    legit.source = "legit"
    hogs = [_engine(budget) for _ in range(3)]
    woken: List[str] = []
    legit.wake = lambda: woken.append("legit")
    for i, hog in enumerate(hogs):
        hog.source = "hog"
        hog.wake = lambda i=i: woken.append(f"hog{i}")  # type: ignore[misc]
    budget.charge(legit, 40)
    raised = []
    for i, hog in enumerate(hogs):
        try:
            budget.charge(hog, 25)  # the third goes over: 40 + 75 > 100
        except MessageTooLarge as exc:  # the caller's own message was the one
            raised.append(f"hog{i}")
            assert "budget" in str(exc) and "100" not in str(exc)
    assert len(woken + raised) == 1 and (woken + raised)[0].startswith("hog")
    assert legit.interruption is None and budget.total <= 100


def test_sources_carrying_ipv4() -> None:
    assert source_of(("2002:c000:0207::1", 1, 0, 0)) == "192.0.2.7"  # 6to4
    assert source_of(("64:ff9b::c000:207", 1, 0, 0)) == "192.0.2.7"  # NAT64
    assert source_of(("64:ff9b::c000:208", 1, 0, 0)) == "192.0.2.8"


def test_peer_text_is_never_a_log_format(caplog: pytest.LogCaptureFixture) -> None:
    outcome = handler_outcome(HandshakeError("the peer said %(boom)s 100% %s"), 1.0)
    assert "%(boom)s" not in outcome.log_message
    log = logging.getLogger("callcp.test.format")
    with caplog.at_level(logging.WARNING, logger=log.name):
        Notices(log).note("k", "s", outcome.log_message, "peer", outcome.detail)
    assert caplog.records[0].getMessage().endswith("%(boom)s 100% %s")


def test_queue_survives_a_failing_liveness_check() -> None:
    started: List[str] = []
    queue = HandshakeQueue(limit=1, max_waiting=5, per_source=2)
    first = HandshakeTicket("s", lambda: started.append("a"), lambda: True)
    queue.submit(first)
    dead: List[str] = []

    def broken() -> bool:
        raise ValueError("negative file descriptor")

    queue.submit(
        HandshakeTicket("s", lambda: started.append("b"), broken, lambda: dead.append("b"))
    )
    queue.done(first)
    assert dead == ["b"] and started == ["a"] and queue.waiting == 0 and queue.running == 0
    assert queue.submit(HandshakeTicket("s", lambda: started.append("c"), lambda: True)) is None


def test_queue_refuses_what_could_not_get_its_turn_in_time() -> None:
    """A hello that would wait past the handshake deadline is refused at
    once ("server busy"), not left to time out."""
    started: List[str] = []
    queue = HandshakeQueue(limit=2, max_waiting=1000, per_source=0, patience=1.0)
    queue.cost = 0.1  # seconds per key exchange, as measured
    tickets = [HandshakeTicket("s", lambda: started.append("x"), lambda: True) for _ in range(30)]
    answers = [queue.submit(ticket) for ticket in tickets]
    admitted = [why is None for why in answers]
    # 2 run; waiting n costs n * 0.1 / 2 s: 19 fit within 1 s, the rest are refused
    assert admitted.count(True) == 2 + 19
    assert all(not ok for ok in admitted[21:])
    assert "max_handshakes=2" in str(answers[-1])


# ------------------------------------------- the signed share, the spare ServerHello


def _hello(first: bytes) -> Any:
    from callcp._core.wire import ServerHello

    return ServerHello.decode(first[5:])


def test_a_prepared_server_hello_serves_exactly_one_connection(server_key: Any) -> None:
    """prepare() makes the next ServerHello off the accept path; it goes to
    one connection only, and a server that is stopping prepares none."""
    core = callcp._engine.ServerCore(ServerOptions(key=server_key, logger=logging.getLogger("t")))
    core.prepare()
    spare = core._spare
    assert spare is not None
    core.prepare()  # (one at most)
    assert core._spare is spare
    first, hello1 = core.arrive(("192.0.2.1", 1000))
    second, hello2 = core.arrive(("192.0.2.2", 1000))
    assert first is not None and second is not None
    assert first.engine is spare[0] and second.engine is not spare[0]
    assert _hello(hello1).random != _hello(hello2).random
    # one signed share serves both: one RSA signature per share_lifetime
    assert _hello(hello1).x25519_public == _hello(hello2).x25519_public
    core.stopping = True
    core._spare = None
    core.prepare()
    assert core._spare is None


def test_the_share_is_renewed_on_time_and_a_stale_spare_is_not_used(server_key: Any) -> None:
    """A share is handed out for share_lifetime seconds and valid for
    share_lifetime + handshake_timeout; refresh() renews it ahead of time
    (when idle); a spare made with an older share is never sent."""
    from callcp._core.shares import ShareKeeper

    keeper = ShareKeeper(server_key, lifetime=60.0, grace=10.0)
    first = keeper.current(1000.0)
    assert first.expiry == 1070 and keeper.current(1059.0) is first
    keeper.refresh(1057.0)  # not due within AHEAD seconds: kept
    assert keeper.current(1057.5) is first
    keeper.refresh(1058.5)  # due within AHEAD seconds: renewed now
    second = keeper.current(1058.6)
    assert second is not first and second.public != first.public
    assert keeper.current(1200.0) is not second  # overdue: renewed at once
    assert keeper.current(0.0).created == 0.0  # the clock went back: renewed

    core = callcp._engine.ServerCore(ServerOptions(key=server_key, logger=logging.getLogger("t")))
    core.prepare()
    assert core._spare is not None
    stale_engine = core._spare[0]
    renewed = core.shares._renew(time.time())  # (a rotation happened)
    arrival, hello = core.arrive(("192.0.2.1", 1000))
    assert arrival is not None and arrival.engine is not stale_engine
    assert _hello(hello).x25519_public == renewed.public


def test_share_lifetime_is_validated() -> None:
    assert ServerOptions(share_lifetime=1).share_lifetime == 1
    for bad in (0, 0.5, 3601, True, "60", None):
        with pytest.raises(ValueError, match="share_lifetime"):
            ServerOptions(share_lifetime=bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------ keepalive


def test_keepalive_pings_after_interval_and_gives_up_after_timeout(server_key: Any) -> None:
    from callcp._engine import Keepalive
    from tests.helpers import Pair

    ka = Keepalive(interval=5.0, timeout=2.0, now=100.0)
    assert ka.next_wake() == 105.0
    assert ka.due(104.9) is None
    assert ka.due(105.0) == "ping" and ka.next_wake() == 107.0
    assert ka.due(106.0) is None  # waiting for an answer
    ka.heard(106.5)  # any bytes: alive
    assert ka.next_wake() == 111.5 and ka.due(111.5) == "ping"
    assert ka.due(113.5) == "dead"
    pair = Pair(server_key)
    pair.handshake()
    err = ka.unresponsive(pair.client, 113.5)
    assert "peer unresponsive for 7 s" in str(err) and err.code == CloseCode.TIMEOUT
    assert pair.client.state.name == "FAILED"
    assert pair.client.data_to_send()  # a CLOSE(TIMEOUT), should the peer wake up


def test_keepalive_options_are_validated() -> None:
    assert ClientOptions(keepalive_interval=1).keepalive_interval == 1
    for bad in (0, -1, float("inf"), "5"):
        with pytest.raises(ValueError, match="keepalive_interval"):
            ClientOptions(keepalive_interval=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="keepalive_timeout"):
            ServerOptions(keepalive_timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keepalive_timeout"):
        ServerOptions(keepalive_timeout=None)  # type: ignore[arg-type]


def test_short_share_lifetimes_do_not_re_sign_on_every_wake_up(server_key: Any) -> None:
    from callcp._core.shares import ShareKeeper

    keeper = ShareKeeper(server_key, lifetime=1.0, grace=10.0)
    made = []
    for i in range(100):  # an acceptor waking every 10 ms for a second
        keeper.refresh(1000.0 + i / 100)
        made.append(keeper.current(1000.0 + i / 100))
    assert len({id(share) for share in made}) <= 3


@pytest.mark.parametrize("how", ["client alert", "bad hello", "low-order share", "released"])
def test_a_server_lets_go_of_the_share_key_when_a_handshake_ends(
    server_key: Any, how: str
) -> None:
    """A share's private key is held by the connections whose ServerHello
    carried it only until they are done with it, failed or not."""
    from callcp._core.errors import CallcpError
    from callcp._core.wire import MAGIC, FrameType, frame

    core = callcp._engine.ServerCore(ServerOptions(key=server_key, logger=logging.getLogger("t")))
    arrival, _ = core.arrive(("192.0.2.1", 1000))
    assert arrival is not None
    proto = arrival.engine.core
    assert proto._eph is not None
    if how == "released":
        arrival.release()  # (dropped before its key exchange: a timeout, a shutdown)
    else:
        body = {
            "client alert": b"\x00\x04untrusted key",
            "bad hello": MAGIC + b"\x00",
            "low-order share": MAGIC + b"\x00\x04" + bytes(32) + bytes(32) + b"\x00\x00",
        }[how]
        kind = FrameType.ALERT if how == "client alert" else FrameType.CLIENT_HELLO
        proto.receive_data(frame(kind, body))
        with pytest.raises(CallcpError):
            while True:
                event = proto.next_event()
                if type(event).__name__ == "DecryptionRequested":
                    proto.premaster_decrypted(None)
    assert proto._eph is None
    core.stopped()
    assert core._spare is None and core.shares._share is None


def test_keepalive_waits_longer_only_while_our_send_queue_drains() -> None:
    from callcp._engine import Keepalive

    ka = Keepalive(interval=1.0, timeout=2.0, now=0.0)
    assert ka.due(1.0, unsent=5000) == "ping"  # the PING queues behind 5000 bytes
    assert ka.due(3.0, unsent=3000) is None  # the peer took 2000: alive, wait on
    assert ka.next_wake() == 5.0
    assert ka.due(5.0, unsent=3000) == "dead"  # nothing taken since: gone
    frozen = Keepalive(interval=1.0, timeout=2.0, now=0.0)
    assert frozen.due(1.0, unsent=5000) == "ping"
    assert frozen.due(3.0, unsent=5000) == "dead"  # within interval + timeout
