"""The attacker of tests/test_hostile_load.py, in its own process.

    python -m tests.hostile_client MODE PARAMS_JSON

Every socket is bound to 127.0.0.2 before it connects to 127.0.0.1:PORT, so
the server's per-source limits count the attacker as one source apart from
the legitimate client (127.0.0.1).  Every loop is bounded in count and time,
and every socket has a timeout.

The process starts (and imports) while the server starts: it waits for
one JSON line on stdin with the late parameters (``{"port": N}``), then
attacks.  Progress goes to stdout as JSON lines: ``{"event": "start"}`` when
the attack begins, ``{"event": "done", ...results}`` when it is over and
every socket is closed.  Modes that hold connections open (``trickle``,
``silent``, ``partial``) hold them for ``hold`` seconds, or until stdin
closes.

Modes:

``trickle``  (rate, duration, max_count, hold)
    Connections at ``rate`` per second, each sending the first byte of a
    ClientHello, then silent.
``silent``  (count, hold)
    ``count`` connections that read the server's first frame (ServerHello, or
    an ALERT refusing them) and then say nothing.
``abandon``  (duration, max_count, parallel)
    One valid ClientHello computed once, then: connect, read the ServerHello,
    send that hello, close at once; as fast as this process can, with
    ``parallel`` connections in flight (non-blocking sockets).
``burst``  (count)
    ``count`` connections read their ServerHello; then one valid ClientHello
    (as in ``abandon``) is sent on each, as fast as possible, and each
    closes at once.
``byte_record``  (count, size)
    ``count`` connections complete a real handshake, then each sends one
    ``size``-byte message record one byte per send() (TCP_NODELAY), round
    robin, and waits for its echo.
``partial``  (count, partial_bytes, pause, hold)
    ``count`` connections complete a real handshake, one after the other
    each sends ``partial_bytes`` of message fragments (DATA records, never
    the DATA_END) and stalls; then every connection is read to see which
    the server closed, and how.
``garbage``  (count)
    ``count`` connections that read the ServerHello, send a malformed
    ClientHello, and read the server's ALERT.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from callcp._core.events import NEED_DATA, CloseReceived, HandshakeCompleted, MessageReceived
from callcp._core.protocol import ClientProtocol
from callcp._core.wire import HEADER, HEADER_SIZE, FrameType, decode_alert, frame

ATTACKER = "127.0.0.2"
SERVER = "127.0.0.1"
#: Every attacker socket's timeout (connect, reads, writes).
SOCK_TIMEOUT = 10.0
#: No mode runs longer than this, whatever its parameters say.
MAX_SECONDS = 120.0

_stop = threading.Event()
_go = threading.Event()
_late: Dict[str, Any] = {}


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _watch_stdin() -> None:
    """The first line on stdin is a JSON object of late parameters (the
    server's port, known once it runs) and the signal to begin; end of
    stdin is the signal to stop."""
    try:
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(0, 4096)
            if not chunk:
                return
            line += chunk
        _late.update(json.loads(line))
        _go.set()
        while os.read(0, 4096):
            pass
    finally:
        _stop.set()
        _go.set()


def attacker_socket(port: int, timeout: float = SOCK_TIMEOUT) -> socket.socket:
    """A TCP connection from 127.0.0.2 to the server."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.bind((ATTACKER, 0))
        sock.connect((SERVER, port))
    except BaseException:
        sock.close()
        raise
    return sock


def recv_exactly(sock: socket.socket, n: int) -> Optional[bytes]:
    """``n`` bytes, or None if the peer closed first."""
    parts: List[bytes] = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            return None
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def read_frame(sock: socket.socket) -> Optional[Tuple[int, bytes]]:
    """One plaintext frame (type, body), or None at end of stream."""
    header = recv_exactly(sock, HEADER_SIZE)
    if header is None:
        return None
    ftype, length = HEADER.unpack(header)
    body = recv_exactly(sock, length)
    return None if body is None else (ftype, body)


def first_frame(sock: socket.socket) -> Tuple[str, str]:
    """What the server said first: ("hello", ""), ("alert", reason), or
    ("eof" | "reset" | "timeout" | "error", detail)."""
    try:
        got = read_frame(sock)
    except socket.timeout:
        return "timeout", ""
    except ConnectionResetError as exc:
        return "reset", str(exc)
    except OSError as exc:
        return "error", f"{type(exc).__name__}: {exc}"
    if got is None:
        return "eof", ""
    ftype, body = got
    if ftype == FrameType.SERVER_HELLO:
        return "hello", ""
    if ftype == FrameType.ALERT:
        code, reason = decode_alert(body)
        return "alert", f"{code}:{reason}"
    return "error", f"unexpected frame type 0x{ftype:02x}"


def _accept_any(fingerprint: str, der: bytes) -> None:
    pass


def handshake(port: int) -> Tuple[socket.socket, ClientProtocol]:
    """A connection whose handshake is complete (the server's Finished checked)."""
    sock = attacker_socket(port)
    core = ClientProtocol(_accept_any)
    deadline = time.monotonic() + SOCK_TIMEOUT
    try:
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("the handshake did not complete")
            event = core.next_event()
            if isinstance(event, HandshakeCompleted):
                break
            out = core.data_to_send()
            if out:
                sock.sendall(out)
            if event is NEED_DATA:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("the server closed during the handshake")
                core.receive_data(data)
    except BaseException:
        sock.close()
        raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, core


def client_hello_frame(port: int) -> bytes:
    """One valid CLIENT_HELLO frame for this server's key (its premaster is
    encrypted to the server's RSA key: every copy costs an RSA decryption)."""
    sock = attacker_socket(port)
    try:
        got = read_frame(sock)
    finally:
        sock.close()
    assert got is not None and got[0] == FrameType.SERVER_HELLO, got
    core = ClientProtocol(_accept_any)
    core.receive_data(frame(FrameType.SERVER_HELLO, got[1]))
    core.next_event()  # ServerKeyAccepted: the hello and Finished are queued
    out = core.data_to_send()
    ftype, length = HEADER.unpack_from(out, 0)
    assert ftype == FrameType.CLIENT_HELLO == 0x02, ftype
    return out[: HEADER_SIZE + length]


def hold(seconds: float) -> None:
    _stop.wait(seconds)


def close_all(socks: List[socket.socket]) -> None:
    for sock in socks:
        try:
            sock.close()
        except OSError:
            pass


def _errors(errors: Dict[str, int], exc: BaseException) -> None:
    key = type(exc).__name__
    errors[key] = errors.get(key, 0) + 1


# ======================================================================= modes


def mode_trickle(p: Dict[str, Any]) -> Dict[str, Any]:
    rate, duration, max_count = p["rate"], p["duration"], p["max_count"]
    socks: List[socket.socket] = []
    errors: Dict[str, int] = {}
    emit("start")
    t0 = time.monotonic()
    end = t0 + min(duration, MAX_SECONDS)
    while len(socks) + sum(errors.values()) < max_count and not _stop.is_set():
        now = time.monotonic()
        if now >= end:
            break
        due = t0 + (len(socks) + sum(errors.values())) / rate
        if due > now:
            time.sleep(due - now)
        try:
            sock = attacker_socket(p["port"])
            sock.sendall(b"\x02")  # the first byte of a CLIENT_HELLO frame
            socks.append(sock)
        except OSError as exc:
            _errors(errors, exc)
    elapsed = time.monotonic() - t0
    hold(p["hold"])
    # How many the server still holds open (it must not have refused them).
    still_open = 0
    for sock in socks:
        sock.settimeout(0.0)
        try:
            still_open += sock.recv(65536, socket.MSG_PEEK) != b""
        except BlockingIOError:
            still_open += 1
        except OSError:
            pass
    close_all(socks)
    return {"opened": len(socks), "errors": errors, "seconds": elapsed, "still_open": still_open}


def mode_silent(p: Dict[str, Any]) -> Dict[str, Any]:
    kept: List[socket.socket] = []
    outcomes: Dict[str, int] = {}
    reasons: Dict[str, int] = {}
    emit("start")
    t0 = time.monotonic()
    for _ in range(p["count"]):
        if _stop.is_set() or time.monotonic() - t0 > MAX_SECONDS:
            break
        try:
            sock = attacker_socket(p["port"])
        except OSError as exc:
            outcomes["connect " + type(exc).__name__] = (
                outcomes.get("connect " + type(exc).__name__, 0) + 1
            )
            continue
        what, detail = first_frame(sock)
        outcomes[what] = outcomes.get(what, 0) + 1
        if what == "hello":
            kept.append(sock)  # admitted: stay silent
        else:
            if detail:
                reasons[detail] = reasons.get(detail, 0) + 1
            sock.close()
    elapsed = time.monotonic() - t0
    emit("ready", outcomes=outcomes)
    hold(p["hold"])
    close_all(kept)
    return {"outcomes": outcomes, "reasons": reasons, "seconds": elapsed}


def mode_abandon(p: Dict[str, Any]) -> Dict[str, Any]:
    hello = client_hello_frame(p["port"])
    parallel = p.get("parallel", 1)
    sel = selectors.DefaultSelector()
    opened = sent = refused = 0
    errors: Dict[str, int] = {}
    reasons: Dict[str, int] = {}

    def finish(sock: socket.socket) -> None:
        sel.unregister(sock)
        sock.close()  # at once: whatever the server does for it is wasted

    emit("start", hello_bytes=len(hello), parallel=parallel)
    t0 = time.monotonic()
    end = t0 + min(p["duration"], MAX_SECONDS)
    while not _stop.is_set():
        now = time.monotonic()
        if now < end:  # keep ``parallel`` connections in flight
            while len(sel.get_map()) < parallel and opened < p["max_count"]:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.bind((ATTACKER, 0))
                sock.connect_ex((SERVER, p["port"]))  # EINPROGRESS: the ServerHello tells
                sel.register(sock, selectors.EVENT_READ, [bytearray(), now])
                opened += 1
        if not sel.get_map() or now > end + SOCK_TIMEOUT:
            break
        for key, _ in sel.select(0.2):
            sock, (buf, _) = key.fileobj, key.data  # type: ignore[misc]
            try:
                chunk = sock.recv(4096)  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            except OSError as exc:
                _errors(errors, exc)
                finish(sock)  # type: ignore[arg-type]
                continue
            if not chunk:
                errors["eof"] = errors.get("eof", 0) + 1
                finish(sock)  # type: ignore[arg-type]
                continue
            buf += chunk
            if len(buf) < HEADER_SIZE:
                continue
            ftype, length = HEADER.unpack_from(buf, 0)
            if len(buf) < HEADER_SIZE + length:
                continue
            if ftype == FrameType.SERVER_HELLO:
                try:
                    if sock.send(hello) == len(hello):  # type: ignore[union-attr]
                        sent += 1
                    else:
                        errors["short send"] = errors.get("short send", 0) + 1
                except OSError as exc:
                    _errors(errors, exc)
            elif ftype == FrameType.ALERT:
                refused += 1
                code, reason = decode_alert(bytes(buf[HEADER_SIZE : HEADER_SIZE + length]))
                reasons[f"{code}:{reason}"] = reasons.get(f"{code}:{reason}", 0) + 1
            else:
                errors["unexpected frame"] = errors.get("unexpected frame", 0) + 1
            finish(sock)  # type: ignore[arg-type]
        for key in list(sel.get_map().values()):  # none may linger
            if time.monotonic() - key.data[1] > SOCK_TIMEOUT:
                errors["timeout"] = errors.get("timeout", 0) + 1
                finish(key.fileobj)  # type: ignore[arg-type]
    elapsed = time.monotonic() - t0
    for key in list(sel.get_map().values()):
        finish(key.fileobj)  # type: ignore[arg-type]
    sel.close()
    return {
        "opened": opened,
        "sent": sent,
        "refused": refused,
        "reasons": reasons,
        "errors": errors,
        "seconds": elapsed,
    }


def mode_burst(p: Dict[str, Any]) -> Dict[str, Any]:
    hello = client_hello_frame(p["port"])
    socks: List[socket.socket] = []
    outcomes: Dict[str, int] = {}
    emit("start")
    t0 = time.monotonic()
    for _ in range(p["count"]):  # every connection has its ServerHello...
        sock = attacker_socket(p["port"])
        what, _ = first_frame(sock)
        outcomes[what] = outcomes.get(what, 0) + 1
        socks.append(sock)
    t1 = time.monotonic()
    for sock in socks:  # ...then all the hellos at once...
        sock.sendall(hello)
    for sock in socks:  # ...and every connection closes right after
        sock.close()
    return {
        "outcomes": outcomes,
        "hellos_sent": len(socks),
        "connect_seconds": t1 - t0,
        "burst_seconds": time.monotonic() - t1,
    }


def mode_byte_record(p: Dict[str, Any]) -> Dict[str, Any]:
    count, size = p["count"], p["size"]
    conns = [handshake(p["port"]) for _ in range(count)]
    message = bytes(range(256)) * (size // 256) + bytes(size % 256)
    records = []
    for _, core in conns:
        core.send(message)
        records.append(core.data_to_send())
    assert all(len(r) == len(records[0]) for r in records)
    emit("start", record_bytes=len(records[0]))
    t0 = time.monotonic()
    errors: Dict[str, int] = {}
    alive = list(range(count))
    for i in range(len(records[0])):  # one byte per send(), round robin
        if time.monotonic() - t0 > MAX_SECONDS or _stop.is_set():
            break
        for k in list(alive):
            try:
                conns[k][0].send(records[k][i : i + 1])
            except OSError as exc:
                _errors(errors, exc)
                alive.remove(k)
    send_seconds = time.monotonic() - t0
    emit("sent", seconds=send_seconds)
    delivered = 0
    for k in alive:
        sock, core = conns[k]
        try:
            while True:
                event = core.next_event()
                if isinstance(event, MessageReceived):
                    delivered += event.data == message
                    break
                if event is NEED_DATA:
                    data = sock.recv(262144)
                    if not data:
                        raise ConnectionError("closed before the echo")
                    core.receive_data(data)
                elif isinstance(event, CloseReceived):
                    raise ConnectionError(f"closed by the server: {event}")
        except Exception as exc:  # recorded; the test asserts
            _errors(errors, exc)
    close_all([sock for sock, _ in conns])
    return {
        "connections": count,
        "record_bytes": len(records[0]),
        "sends": len(records[0]) * count,
        "send_seconds": send_seconds,
        "delivered": delivered,
        "errors": errors,
        "seconds": time.monotonic() - t0,
    }


def _outcome(sock: socket.socket, core: ClientProtocol, wait: float) -> str:
    """What became of a stalled connection: "close:CODE" (a sealed CLOSE),
    "alert:...", "eof", "reset", or "open" (nothing within ``wait`` s)."""
    sock.settimeout(wait)
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            try:
                event = core.next_event()
            except Exception as exc:  # the core failed on what it read
                return f"core-error:{type(exc).__name__}:{exc}"
            if isinstance(event, CloseReceived):
                return f"close:{event.code}"
            if event is not NEED_DATA:
                continue
            try:
                data = sock.recv(65536)
            except socket.timeout:
                return "open"
            if not data:
                return "eof"
            core.receive_data(data)
    except ConnectionResetError:
        return "reset"
    except OSError as exc:
        return f"error:{type(exc).__name__}"
    return "open"


def mode_partial(p: Dict[str, Any]) -> Dict[str, Any]:
    count, partial = p["count"], p["partial_bytes"]
    chunk = b"\xa5" * 65536
    conns: List[Tuple[socket.socket, ClientProtocol]] = []
    sent: List[int] = []
    send_errors: Dict[int, str] = {}
    emit("start")
    t0 = time.monotonic()
    for k in range(count):
        if _stop.is_set() or time.monotonic() - t0 > MAX_SECONDS:
            break
        sock, core = handshake(p["port"])
        conns.append((sock, core))
        done = 0
        try:
            while done < partial:
                n = min(len(chunk), partial - done)
                core._seal(FrameType.DATA, chunk[:n])  # a fragment; never the DATA_END
                sock.sendall(core.data_to_send())
                done += n
        except OSError as exc:  # the server may close us (we hold the largest message)
            send_errors[k] = type(exc).__name__
        sent.append(done)
        time.sleep(p["pause"])  # let the server read it all: one connection after another
    emit("ready", sent=sent)
    hold(p["hold"])
    outcomes = [_outcome(sock, core, 2.0) for sock, core in conns]
    close_all([sock for sock, _ in conns])
    return {
        "sent": sent,
        "send_errors": send_errors,
        "outcomes": outcomes,
        "seconds": time.monotonic() - t0,
    }


def mode_garbage(p: Dict[str, Any]) -> Dict[str, Any]:
    # A CLIENT_HELLO frame whose body is not a ClientHello (bad magic).
    junk = frame(FrameType.CLIENT_HELLO, b"NOTCALLCP" + bytes(91))
    outcomes: Dict[str, int] = {}
    emit("start")
    t0 = time.monotonic()
    for _ in range(p["count"]):
        if _stop.is_set() or time.monotonic() - t0 > MAX_SECONDS:
            break
        try:
            sock = attacker_socket(p["port"], timeout=5.0)
        except OSError as exc:
            key = "connect " + type(exc).__name__
            outcomes[key] = outcomes.get(key, 0) + 1
            continue
        try:
            what, _ = first_frame(sock)
            if what == "hello":
                sock.sendall(junk)
                what, _ = first_frame(sock)  # the ALERT saying why: the server is done
                what = "answered " + what
            outcomes[what] = outcomes.get(what, 0) + 1
        except OSError as exc:
            key = type(exc).__name__
            outcomes[key] = outcomes.get(key, 0) + 1
        finally:
            sock.close()
    return {"outcomes": outcomes, "seconds": time.monotonic() - t0}


MODES: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
    "trickle": mode_trickle,
    "silent": mode_silent,
    "abandon": mode_abandon,
    "burst": mode_burst,
    "byte_record": mode_byte_record,
    "partial": mode_partial,
    "garbage": mode_garbage,
}


def main(argv: List[str]) -> None:
    mode, params = argv[1], json.loads(argv[2])
    threading.Thread(target=_watch_stdin, name="stdin-watch", daemon=True).start()
    _go.wait(MAX_SECONDS)
    if _stop.is_set() or not _late:
        emit("done", failed="stdin closed before the go line")
        return
    params.update(_late)
    try:
        result = MODES[mode](params)
    except Exception as exc:
        emit("done", failed=f"{type(exc).__name__}: {exc}")
        raise
    emit("done", **result)


if __name__ == "__main__":
    main(sys.argv)
