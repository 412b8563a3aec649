"""A frame-aware man-in-the-middle TCP proxy for attack tests over real sockets.

The proxy listens on 127.0.0.1:0; for each accepted client it opens a TCP
connection to ``target`` (settable at any time, so one address can lead to
different servers) and relays both directions, each in its own thread.

Each direction's byte stream is cut into callcp frames (``type u8 | length
u32 big-endian | body``, see src/callcp/_core/wire.py) and every whole frame
is handed to a hook::

    hook(relay, index, frame) -> list of byte strings to forward

where ``index`` counts the frames of that direction from 0.  Return
``[frame]`` to relay, ``[]`` to drop, ``[frame, frame]`` to duplicate, a
modified frame to tamper, or hold frames back and release them later to
reorder.  Hooks may also write into the other direction (``relay.to_server``
/ ``relay.to_client``, e.g. to reflect a record) or end a direction
(``relay.end_to_client()``: the client sees a clean TCP FIN; further server
bytes are discarded).

The proxy never resets a connection on its own: when a direction ends it
sends FIN onward and keeps draining the other direction until it ends too,
so tests observe what the callcp endpoints do, not proxy artefacts.  It
records every byte each side sent (``relay.c2s_raw`` / ``relay.s2c_raw``,
before hooks) for replay attacks.
"""

from __future__ import annotations

import socket
import threading
from typing import Callable, List, Sequence, Tuple

Hook = Callable[["Relay", int, bytes], Sequence[bytes]]

#: A frame longer than this is not buffered: the rest of that direction is
#: passed through untouched (the proxy itself stays bounded).
MAX_BUFFERED_FRAME = 1 << 20


def forward(relay: Relay, index: int, frame: bytes) -> Sequence[bytes]:
    return [frame]


def make_frame(ftype: int, body: bytes) -> bytes:
    return bytes([ftype]) + len(body).to_bytes(4, "big") + body


class _Side:
    """One socket and the lock that keeps whole frames whole on it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.open = True  # False once we sent FIN or a write failed

    def send(self, data: bytes) -> None:
        with self.lock:
            if not self.open or not data:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self.open = False

    def finish(self) -> None:
        """Send FIN (once)."""
        with self.lock:
            if not self.open:
                return
            self.open = False
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass


class Relay:
    """One proxied connection: client <-> proxy <-> server."""

    def __init__(
        self,
        proxy: FrameProxy,
        index: int,
        client: socket.socket,
        server: socket.socket,
    ) -> None:
        self.proxy = proxy
        self.index = index
        self._client = _Side(client)
        self._server = _Side(server)
        self.c2s_raw = bytearray()
        self.s2c_raw = bytearray()
        self.c2s_frames: List[bytes] = []
        self.s2c_frames: List[bytes] = []
        self.state: dict = {}  # scratch space for hooks
        self.done = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._pump,
                args=(client, self._server, proxy.c2s, self.c2s_raw, self.c2s_frames),
                name=f"proxy-{index}-c2s",
                daemon=True,
            ),
            threading.Thread(
                target=self._pump,
                args=(server, self._client, proxy.s2c, self.s2c_raw, self.s2c_frames),
                name=f"proxy-{index}-s2c",
                daemon=True,
            ),
        ]
        for t in self._threads:
            t.start()
        threading.Thread(target=self._reap, name=f"proxy-{index}-reap", daemon=True).start()

    # hooks' tools ----------------------------------------------------------

    def to_server(self, data: bytes) -> None:
        self._server.send(data)

    def to_client(self, data: bytes) -> None:
        self._client.send(data)

    def end_to_client(self) -> None:
        """A clean TCP close towards the client; later server bytes are dropped."""
        self._client.finish()

    def end_to_server(self) -> None:
        self._server.finish()

    # machinery -------------------------------------------------------------

    def _pump(
        self,
        src: socket.socket,
        dst: _Side,
        hook: Hook,
        raw: bytearray,
        frames: List[bytes],
    ) -> None:
        buf = bytearray()
        passthrough = False
        index = 0
        try:
            while True:
                try:
                    chunk = src.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                raw += chunk
                if passthrough:
                    dst.send(chunk)
                    continue
                buf += chunk
                while len(buf) >= 5:
                    length = int.from_bytes(buf[1:5], "big")
                    if length > MAX_BUFFERED_FRAME:
                        passthrough = True
                        dst.send(bytes(buf))
                        buf.clear()
                        break
                    if len(buf) < 5 + length:
                        break
                    frame = bytes(buf[: 5 + length])
                    del buf[: 5 + length]
                    frames.append(frame)
                    try:
                        out = hook(self, index, frame)
                    except Exception as exc:  # reported to the test
                        self.proxy.errors.append(exc)
                        out = [frame]
                    index += 1
                    for piece in out:
                        dst.send(piece)
            if buf:
                dst.send(bytes(buf))  # a partial frame: pass it on as is
        finally:
            dst.finish()

    def _reap(self) -> None:
        for t in self._threads:
            t.join()
        for side in (self._client, self._server):
            try:
                side.sock.close()
            except OSError:
                pass
        self.done.set()

    def kill(self) -> None:
        """Wake both pumps (used when the proxy closes)."""
        for side in (self._client, self._server):
            try:
                side.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class FrameProxy:
    """Listen on 127.0.0.1:0 and relay to ``target`` through frame hooks."""

    def __init__(
        self,
        target: Tuple[str, int],
        *,
        c2s: Hook = forward,
        s2c: Hook = forward,
        timeout: float = 10.0,
    ) -> None:
        self.target = target
        self.c2s = c2s
        self.s2c = s2c
        self.timeout = timeout
        self.relays: List[Relay] = []
        self.errors: List[BaseException] = []
        self._new_relay = threading.Condition()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        port: int = self._listener.getsockname()[1]
        return port

    @property
    def address(self) -> Tuple[str, int]:
        return ("127.0.0.1", self.port)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(self.timeout)
            try:
                server = socket.create_connection(self.target, timeout=self.timeout)
            except OSError:
                client.close()
                continue
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._new_relay:
                relay = Relay(self, len(self.relays), client, server)
                self.relays.append(relay)
                self._new_relay.notify_all()

    def relay(self, index: int, timeout: float = 5.0) -> Relay:
        """The ``index``-th proxied connection (waits for it to exist)."""
        with self._new_relay:
            if not self._new_relay.wait_for(lambda: len(self.relays) > index, timeout):
                raise AssertionError(f"proxy connection {index} never arrived")
            return self.relays[index]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._listener.close()
        for relay in list(self.relays):
            relay.kill()
        for relay in list(self.relays):
            relay.done.wait(5.0)

    def __enter__(self) -> FrameProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hook_on(
    ftype: int, action: Callable[[Relay, int, bytes], Sequence[bytes]], nth: int = 0
) -> Hook:
    """A hook applying ``action`` to the ``nth`` frame of type ``ftype`` only."""

    def hook(relay: Relay, index: int, frame: bytes) -> Sequence[bytes]:
        if frame[0] != ftype:
            return [frame]
        key = ("seen", ftype, id(hook))
        seen = relay.state.get(key, 0)
        relay.state[key] = seen + 1
        if seen != nth:
            return [frame]
        return action(relay, index, frame)

    return hook


def flip_bit(frame: bytes, offset: int, bit: int = 0x01) -> bytes:
    """``frame`` with one bit flipped at ``offset`` (negative: from the end)."""
    out = bytearray(frame)
    out[offset] ^= bit
    return bytes(out)
