"""The optional rich console UI of the Callcp 1.0 API (``use_display=True``).

``rich`` is an optional dependency (``pip install rich``; or, from the
callcp source directory, ``pip install '.[display]'``: callcp is not on a
package index) and is imported lazily, only when a display is asked for.
Without it, :func:`make_display` returns ``None`` and logs ONE warning per
process: the caller then only logs, exactly as with ``use_display=False``.

The display is an interactive console, not a log.  Even so it never shows keys,
and the server side never shows message contents (only sizes); the client may
echo back what its user typed.  Panels and notes go to standard output,
warnings and errors to standard error.

Every text it shows passes through :func:`printable` first: control
characters (ESC, CR, BEL, C1 controls such as ``\\x9b``, line breaks) are shown
escaped, so text from the peer (an error quoting a close reason, say) cannot
send the terminal an escape sequence or forge a line.  rich itself strips only
a few controls (BEL, BS, VT, FF, CR) and lets ESC through.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from types import ModuleType
from typing import Any, Iterator, Optional

from ._core.wire import printable

__all__ = ["RICH_MISSING_WARNING", "Display", "make_display", "printable", "rich_available"]

RICH_MISSING_WARNING = (
    "rich is not installed; use_display=True falls back to logging "
    "(pip install rich; or, in the callcp source directory, pip install '.[display]')"
)

#: Longest message preview the client display shows, in characters.
PREVIEW_CHARS = 200

_warn_lock = threading.Lock()
_warned = False


def _import_rich() -> ModuleType:
    """Import ``rich.console`` (raises ImportError when rich is missing).

    Kept as a function so tests can simulate a missing ``rich``.
    """
    return importlib.import_module("rich.console")


def rich_available() -> bool:
    """Whether ``rich`` can be imported."""
    try:
        _import_rich()
    except ImportError:
        return False
    return True


class Display:
    """A thin rich console for the Callcp 1.0 classes.

    Thread-safe (rich's Console serialises its output).  ``console`` and
    ``err_console`` are ``rich.console.Console`` objects; by default the
    first writes to standard output, the second (warnings and errors) to
    standard error.  Given only ``console``, everything goes there.

    Raises:
        ImportError: ``rich`` is not installed (see :func:`make_display`).
    """

    def __init__(self, console: Optional[Any] = None, err_console: Optional[Any] = None) -> None:
        rich_console = _import_rich()
        from rich.panel import Panel
        from rich.text import Text

        self._Panel = Panel
        self._Text = Text
        if console is None:
            console = rich_console.Console()
            if err_console is None:
                err_console = rich_console.Console(stderr=True)
        self.console: Any = console
        self.err_console: Any = err_console if err_console is not None else console

    # ------------------------------------------------------------- one-liners

    def _line(self, style: str, prefix: str, message: str, *, error: bool = False) -> None:
        # A Text object, never markup: peer data such as "[bold]" is shown as
        # is; escaped (printable), so no control character reaches the
        # terminal; never wrapped, so one event is one line.
        console = self.err_console if error else self.console
        console.print(self._Text(prefix + printable(message), style=style), soft_wrap=True)

    def print_info(self, message: str) -> None:
        """Show one escaped line on stdout (information)."""
        self._line("cyan", "ℹ ", message)

    def print_success(self, message: str) -> None:
        """Show one escaped line on stdout (a success)."""
        self._line("green", "✔ ", message)

    def print_warning(self, message: str) -> None:
        """Show one escaped line on stderr (a warning)."""
        self._line("yellow", "⚠ ", message, error=True)

    def print_error(self, message: str) -> None:
        """Show one escaped line on stderr (an error)."""
        self._line("bold red", "✖ ", message, error=True)

    # ---------------------------------------------------------------- panels

    def _panel(self, lines: list[str], title: str, style: str) -> None:
        body = self._Text("\n".join(printable(line) for line in lines))
        self.console.print(
            self._Panel(body, title=printable(title), border_style=style, expand=False)
        )

    def startup_banner(
        self, host: str, port: int, fingerprint: str, *, legacy: bool = False
    ) -> None:
        """The server's banner: where it listens and which key it proves
        (``legacy``: Callcp 1.0's wire format, and what it lacks)."""
        protocol = (
            "Protocol      CALLCP 1.0 wire format (RSA-OAEP, AES-256-GCM): no server\n"
            "              authentication, forward secrecy or replay protection"
            if legacy
            else "Protocol      callcp/2 (RSA-2048 + X25519, AES-256-GCM)"
        )
        self._panel(
            [
                f"Listening on  {host}:{port}",
                f"Server key    {fingerprint}",
                protocol,
                "Press Ctrl-C to stop",
            ],
            "callcp server",
            "yellow" if legacy else "blue",
        )

    def connection_banner(self, peer: str, fingerprint: Optional[str] = None) -> None:
        """A client connected (``fingerprint``: its key, with client auth)."""
        lines = [f"Client  {peer}"]
        if fingerprint:
            lines.append(f"Key     {fingerprint}")
        self._panel(lines, "New connection", "cyan")

    def handshake_panel(
        self, peer: str, fingerprint: Optional[str], *, legacy: bool = False
    ) -> None:
        """The handshake finished with ``peer`` (``fingerprint``: its key, if
        known; ``legacy``: Callcp 1.0's wire format)."""
        lines = [f"Peer        {peer}"]
        if fingerprint:
            lines.append(f"Peer key    {fingerprint}")
        if legacy:
            lines.append("Key exchange  RSA-OAEP-SHA256 only (Callcp 1.0: no forward secrecy)")
        else:
            lines.append("Key exchange  RSA-OAEP-SHA256 + X25519 -> HKDF-SHA256")
        self._panel(lines, "Handshake complete", "yellow" if legacy else "green")

    def channel_panel(self, *, legacy: bool = False) -> None:
        """Show the 'Encrypted channel active' panel (``legacy``: Callcp 1.0's)."""
        if legacy:
            self._panel(
                ["AES-256-GCM, Callcp 1.0 wire format: NOT replay-protected, 4068 bytes at most"],
                "Encrypted channel active (Callcp 1.0)",
                "yellow",
            )
            return
        self._panel(
            ["AES-256-GCM, authenticated and replay-protected"], "Encrypted channel active", "green"
        )

    def message(self, direction: str, data: bytes) -> None:
        """A preview of ``data`` (client side only: what the user sent), escaped."""
        text = data.decode("utf-8", errors="replace")
        if len(text) > PREVIEW_CHARS:
            text = text[:PREVIEW_CHARS] + f"… ({len(data)} bytes)"
        self._line("magenta", f"{direction} ", text)

    # --------------------------------------------------------------- spinner

    @contextlib.contextmanager
    def status(self, message: str) -> Iterator[None]:
        """A spinner shown while the ``with`` block runs."""
        with self.console.status(self._Text(printable(message))):
            yield


def make_display(enabled: bool, logger: logging.Logger) -> Optional[Display]:
    """A :class:`Display` if ``enabled`` and rich is installed, else ``None``.

    When rich is missing, logs :data:`RICH_MISSING_WARNING` through
    ``logger`` once per process.  Never raises.
    """
    global _warned
    if not enabled:
        return None
    try:
        return Display()
    except ImportError:
        with _warn_lock:
            first, _warned = not _warned, True
        if first:
            logger.warning(RICH_MISSING_WARNING)
        return None
