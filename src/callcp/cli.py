"""The ``callcp`` command: ``serve``, ``send``, ``send-file``, ``keygen``, ``fingerprint``,
``bench``.

Run it as ``callcp`` (the console script) or ``python -m callcp``.  This module
is deliberately thin: it parses arguments, calls callcp's public API and
prints.  ``bench`` only hands its arguments to the benchmark harness, which
is not part of the package: it lives in the source repository's benchmarks/
directory and is imported from there, when it is run (see :func:`cmd_bench`).
What this module owns is the small application protocol of ``callcp serve``:

- a message is answered with the same message (upper-cased with ``--upper``);
- a stream is a file: with ``--receive-dir`` it is stored under the base name
  the sender gave (:func:`safe_file_name`), never overwriting anything
  (``callcp._inbox``), and confirmed with one message
  ``stored <name> <length> <sha256hex>`` that ``send-file`` checks against
  its own SHA-256; without ``--receive-dir`` (or for an unsafe name) the
  connection is closed with ``CloseCode.REFUSED`` and a reason.

Exit codes
    0    success
    1    unexpected internal error (a bug: run with -v and report it)
    2    usage error: bad or missing arguments (a bad port, a malformed
         --fingerprint, an unknown command...)
    3    network: nothing listening, host unreachable or unknown, timed out,
         connection closed or reset, address already in use
    4    the server's key is not trusted: it changed, it is unknown and
         --no-tofu was given, or the known-hosts line for it is malformed
    5    handshake or client-authentication failure
    6    protocol or integrity error: tampered or malformed data, a SHA-256
         mismatch after send-file, an unexpected reply, the server refused
    7    local file or key error: missing or unreadable file, bad key file,
         wrong passphrase, cannot write, refusing to overwrite
    130  interrupted (Ctrl-C)

Every error ends as one line on standard error, ``callcp: error: ...``; with
``-v`` the traceback is printed before it.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import importlib
import io
import logging
import os
import re
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    NoReturn,
    Optional,
    Sequence,
    Tuple,
)

import callcp
from callcp import (
    CallcpTimeout,
    ClientAuthError,
    CloseCode,
    Connection,
    ConnectionClosed,
    ConnectionClosedOK,
    CryptoError,
    HandshakeError,
    HandshakeTimeout,
    KeyManagementError,
    KeyPair,
    LocalProtocolError,
    RemoteProtocolError,
    ServerKeyChanged,
    ServerKeyError,
    StreamAbortedError,
    StreamPending,
    StreamTooLarge,
    TransportError,
)
from callcp._common import (
    DEFAULT_PORT,
    DEFAULT_SERVER_KEY,
    parse_ticket_keys,
    ticket_key_line,
)
from callcp._core.wire import printable
from callcp._inbox import (
    DEFAULT_LIMITS,
    Inbox,
    InboxLimits,
    Refused,
    safe_file_name,
)
from callcp._options import CALLCP1, CALLCP2, PROTOCOLS
from callcp.hsm import is_pkcs11_uri
from callcp.keys import PASSPHRASE_ENV, _write_new, _write_temp, load_public_key
from callcp.sync import _stopping_on_signals
from callcp.trust import (
    DEFAULT_KNOWN_HOSTS,
    KnownHosts,
    KnownHostsEntry,
    format_address,
    normalize_fingerprint,
)

__all__ = ["main", "build_parser", "make_server", "safe_file_name"]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_NETWORK = 3
EXIT_UNTRUSTED = 4
EXIT_HANDSHAKE = 5
EXIT_PROTOCOL = 6
EXIT_LOCAL = 7
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    unexpected internal error (run with -v and report it)
  2    usage error (bad or missing arguments)
  3    network: nothing listening, unreachable, timed out, connection closed
  4    the server's key is not trusted (changed, or unknown with --no-tofu)
  5    handshake or client-authentication failure
  6    protocol or integrity error (SHA-256 mismatch, server refused, bad data)
  7    local file or key error (missing/unreadable file, bad key, passphrase)
  130  interrupted (Ctrl-C)
"""

KEYS_HELP = f"""\
keys:
  Servers keep their RSA key in {DEFAULT_SERVER_KEY} (generated on first run);
  clients remember servers' keys in {DEFAULT_KNOWN_HOSTS} (trust on first use,
  as SSH does). Private key files are encrypted with the passphrase in the
  environment variable {PASSPHRASE_ENV} when it is set.
"""

#: Where ``callcp keygen --next`` puts the key a server will use next.
DEFAULT_NEXT_KEY = Path("~/.callcp/server_key.next.pem")
#: The server's reply to a stored file: ``stored <name> <length> <sha256hex>``.
STORED_PREFIX = "stored "
REFUSE_FILES_REASON = "this server does not accept files (start it with --receive-dir)"
#: Close codes that mean "the peer reported a protocol problem or refused".
_PROTOCOL_CLOSE_CODES = frozenset(
    {
        CloseCode.PROTOCOL_ERROR,
        CloseCode.DECRYPT_ERROR,
        CloseCode.MESSAGE_TOO_LARGE,
        CloseCode.REFUSED,
        CloseCode.UNSUPPORTED_VERSION,
    }
)

log = logging.getLogger("callcp.cli")


class CommandError(Exception):
    """An error the CLI itself detected, with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ====================================================================== parsing


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line on stderr (and exit code 2),
    with a hint where one helps."""

    def error(self, message: str) -> NoReturn:
        hint = _usage_hint(message, self)
        self.exit(EXIT_USAGE, f"callcp: error: {message}{hint} (see '{self.prog} --help')\n")


#: The arguments main() is parsing (for the hints of usage errors).
_parsing: List[str] = []


def _usage_hint(message: str, parser: argparse.ArgumentParser) -> str:
    """A hint for a usage error: the command meant by a misspelt one; the
    HOST PORT split of ``HOST:PORT`` given as one argument."""
    choice = re.search(r"argument COMMAND: invalid choice: '([^']*)'", message)
    if choice is not None:
        commands = re.findall(r"'([a-z-]+)'", message.split("(choose from", 1)[-1])
        close = difflib.get_close_matches(choice[1], commands, n=1, cutoff=0.6)
        return f"; did you mean '{close[0]}'?" if close else ""
    if message.startswith("argument PORT: invalid port"):
        for token in _parsing:
            joined = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\s\[\]]+):(\d{1,5})", token)
            if joined is not None:
                host = joined[1].strip("[]")
                return (
                    f"; {token!r} is HOST:PORT in one argument: give them as two, "
                    f"'{parser.prog} {host} {joined[2]} ...'"
                )
    return ""


def _port(text: str, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    try:
        port = int(text, 10)
    except ValueError:
        port = -1
    if not low <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"invalid port {text!r}: expected a number from {low} to 65535"
        )
    return port


def _listen_port(text: str) -> int:
    return _port(text, allow_zero=True)


def _fingerprint(text: str) -> str:
    try:
        return normalize_fingerprint(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid fingerprint {text[:80]!r}: expected 'SHA256:' followed by 43 base64 "
            "characters, as `callcp fingerprint` prints"
        ) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected seconds >= 0")
    return value


def _count(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: expected an integer >= 1")
    return value


def _count_or_zero(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: expected an integer >= 0")
    return value


_SIZE = re.compile(r"([0-9]+)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G (binary) suffix: ``65536``, ``16M``, ``1GiB``."""
    match = _SIZE.fullmatch(text.strip())
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: expected a number of bytes >= 1, optionally with K, M or G"
        )
    return int(match.group(1)) << (10 * " kmg".index(match.group(2).lower() or " "))


def _name_problem(name: str) -> Optional[str]:
    """Why a stream name cannot be sent (callcp/2: printable UTF-8, at most 255 bytes)."""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    if size > 255:
        return f"it is {size} bytes of UTF-8, over the limit of 255"
    if not name.isprintable():
        return "it contains control characters"
    return None


def _stream_name(text: str) -> str:
    problem = _name_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"invalid name {text[:80]!r}: {problem}")
    return text


def _global_options(suppress: bool) -> _Parser:
    """-v/-q/--no-display, accepted before and after the command name."""
    default: Dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    p = _Parser(add_help=False)
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        **(default or {"default": 0}),
        help="more output: log to stderr at INFO (-vv: DEBUG); errors show their traceback",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        **(default or {"default": False}),
        help="less output: no progress, notes or warnings (results and errors still print)",
    )
    p.add_argument(
        "--no-display",
        action="store_true",
        **(default or {"default": False}),
        help="never use rich (plain text output, e.g. plain progress lines)",
    )
    return p


def _client_options() -> _Parser:
    p = _Parser(add_help=False)
    trust = p.add_mutually_exclusive_group()
    trust.add_argument(
        "--fingerprint",
        metavar="SHA256:...",
        type=_fingerprint,
        help="accept only the server key with this fingerprint (a pin; the known-hosts "
        "file is then not used)",
    )
    trust.add_argument(
        "--insecure",
        action="store_true",
        help="DO NOT check the server's key at all: encrypted but NOT authenticated "
        "(anyone on the path can impersonate the server); for tests only",
    )
    p.add_argument(
        "--known-hosts",
        metavar="PATH",
        help=f"known-hosts file (default: {DEFAULT_KNOWN_HOSTS})",
    )
    p.add_argument(
        "--no-tofu",
        action="store_true",
        help="refuse servers that are not in the known-hosts file yet (no trust on first use)",
    )
    p.add_argument(
        "--client-key",
        metavar="PATH",
        help="authenticate with this RSA private key (PEM, or a pkcs11: URI), for servers "
        f"started with --authorized-keys (passphrase: ${PASSPHRASE_ENV})",
    )
    p.add_argument(
        "--insecure-key-permissions",
        action="store_true",
        help="use a --client-key file that other users may read or write (else refused)",
    )
    p.add_argument(
        "--timeout",
        metavar="S",
        type=_seconds,
        default=30.0,
        help="seconds to wait for each network operation (default: 30; 0: wait forever)",
    )
    return p


def _protocol_option(p: argparse.ArgumentParser, legacy_use: str) -> None:
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=CALLCP2,
        help=f"the wire protocol (default: {CALLCP2}); {CALLCP1}: {legacy_use}, with "
        "Callcp 1.0's weaknesses (no server authentication, no forward secrecy, no replay "
        "protection, messages of at most 4068 bytes), a warning per connection",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``callcp`` argument parser."""
    parser = _Parser(
        prog="callcp",
        description="Encrypted, authenticated, message-oriented channels over plain TCP\n"
        "(callcp/2: RSA + X25519 key exchange, AES-256-GCM). Run 'callcp COMMAND --help'\n"
        "for a command's options.",
        epilog=KEYS_HELP + "\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_options(suppress=False)],
    )
    parser.add_argument(
        "--version", action="version", version=f"callcp {callcp.__version__} (protocol callcp/2)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    common = _global_options(suppress=True)
    client = _client_options()

    def add(
        name: str, help: str, description: str, parents: Sequence[_Parser] = ()
    ) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=description,
            epilog=EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common, *parents],
        )

    # -- serve
    p = add(
        "serve",
        "run a server (echo by default) until Ctrl-C",
        "Run a callcp server until Ctrl-C (or SIGTERM), then shut down gracefully.\n"
        "Prints one line, 'listening on HOST:PORT (server key SHA256:...)'; give that\n"
        "fingerprint to clients (callcp send --fingerprint ...). Each message is\n"
        "echoed back (in upper case with --upper). Files sent with `callcp send-file`\n"
        "are stored in --receive-dir under the base name the sender gave, NFC-\n"
        "normalised (never overwriting: 'name (1).ext'...; dotfiles, names starting\n"
        "with '-', blank names, '.part' names, names with control or bidi characters\n"
        "and names over 200 bytes are refused) and confirmed with their SHA-256,\n"
        "within --max-file-size, --max-files, --max-total-size and --min-free-space.\n"
        "Without --receive-dir, files are refused.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument(
        "--port",
        type=_listen_port,
        default=DEFAULT_PORT,
        help=f"port to listen on (default: {DEFAULT_PORT}; 0: any free port)",
    )
    p.add_argument(
        "--key",
        metavar="PATH",
        help=f"server private key, generated there on first run (default: {DEFAULT_SERVER_KEY}), "
        "or a pkcs11: URI naming a key in a PKCS#11 token",
    )
    p.add_argument(
        "--next-key",
        metavar="PATH",
        help="the private key this server will use next (see keygen --next): announced to "
        "every client, with proof, so trust-on-first-use clients accept the switch silently",
    )
    p.add_argument("--upper", action="store_true", help="reply in upper case instead of echoing")
    p.add_argument(
        "--receive-dir", metavar="DIR", help="accept files and store them here (created if needed)"
    )
    p.add_argument(
        "--max-file-size",
        metavar="BYTES",
        type=_size,
        default=DEFAULT_LIMITS.max_file_size,
        help="with --receive-dir: largest file accepted, e.g. 500M (default: 1G)",
    )
    p.add_argument(
        "--max-total-size",
        metavar="BYTES",
        type=_size,
        default=DEFAULT_LIMITS.max_total_size,
        help="with --receive-dir: most bytes its files may take in all (default: 10G)",
    )
    p.add_argument(
        "--max-files",
        metavar="N",
        type=_count,
        default=DEFAULT_LIMITS.max_files,
        help="with --receive-dir: most files it may hold (default: 10000)",
    )
    p.add_argument(
        "--min-free-space",
        metavar="BYTES",
        type=_size,
        default=DEFAULT_LIMITS.min_free_space,
        help="with --receive-dir: refuse files that would leave less free disk space (default: 1G)",
    )
    p.add_argument(
        "--authorized-keys",
        metavar="FILE",
        help="require client authentication: accept only the client key fingerprints "
        "(or PEM public keys) listed in FILE",
    )
    p.add_argument(
        "--insecure-key-permissions",
        action="store_true",
        help="use key files (--key, --next-key) that other users may read or write "
        "(else refused: chmod 600 them)",
    )
    p.add_argument(
        "--max-message-size",
        metavar="BYTES",
        type=_size,
        help="largest message accepted, e.g. 1048576 or 16M (default: 16M; files are not limited)",
    )
    p.add_argument(
        "--handshake-timeout",
        metavar="S",
        type=_seconds,
        help="seconds a client gets to finish the handshake (default: 10)",
    )
    p.add_argument(
        "--idle-timeout",
        metavar="S",
        type=_seconds,
        help="close connections silent for this long (default: 300; 0: never)",
    )
    p.add_argument(
        "--keepalive-interval",
        metavar="S",
        type=_seconds,
        help="ping a client silent for this long, to find a dead peer or keep a NAT or load "
        "balancer mapping alive (default: never)",
    )
    p.add_argument(
        "--ticket-lifetime",
        metavar="S",
        type=_seconds,
        help="seconds a session ticket stays valid (default: 3600; 0: no tickets)",
    )
    p.add_argument(
        "--max-connections",
        metavar="N",
        type=_count,
        help="serve at most N clients at once; more are refused (default: what the "
        "file-descriptor limit allows, at most 10000)",
    )
    p.add_argument(
        "--max-connections-per-source",
        metavar="N",
        type=_count_or_zero,
        help="serve at most N connections from one address (an IPv6 /64) at once; 0: no "
        "such limit, e.g. behind a balancer without --proxy-protocol (default: 512)",
    )
    p.add_argument(
        "--max-handshakes-per-source",
        metavar="N",
        type=_count_or_zero,
        help="handshakes (waiting or running) from one address at once; 0: no such limit "
        "(default: 64)",
    )
    p.add_argument(
        "--shutdown-timeout",
        metavar="S",
        type=_seconds,
        help="on Ctrl-C or SIGTERM, seconds in-flight requests get to finish (default: 5)",
    )
    p.add_argument(
        "--workers",
        metavar="N",
        type=_count,
        help="run N server processes accepting on the port (SO_REUSEPORT; Linux); default: 1",
    )
    p.add_argument(
        "--ticket-key",
        metavar="FILE",
        help="session ticket keys shared with other servers (callcp keygen --ticket-key), so "
        "a client resumes on any of them; read again when it changes (default: a random "
        "key, this server's alone)",
    )
    p.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="behind a TCP load balancer: connections from --trusted-proxy addresses must "
        "begin with a PROXY protocol header (v1 or v2: HAProxy's send-proxy / send-proxy-v2), "
        "which names the real client (logs, per-address limits); refused otherwise",
    )
    p.add_argument(
        "--trusted-proxy",
        metavar="ADDR[/BITS]",
        action="append",
        default=[],
        help="with --proxy-protocol: a load balancer's address or network (repeat for more)",
    )
    _protocol_option(p, "serve Callcp 1.0 clients (on a port of their own, beside callcp/2)")
    p.set_defaults(func=cmd_serve)

    # -- send
    p = add(
        "send",
        "send one message and print the reply",
        "Connect to a callcp server, send MESSAGE and print the reply (as UTF-8 text,\n"
        "control characters escaped; --raw writes its bytes as they are, to a pipe or\n"
        "a file). MESSAGE '-' reads the message from stdin.\n"
        f"The server's key is checked against {DEFAULT_KNOWN_HOSTS} (trusted and\n"
        "recorded on first use), or against --fingerprint.",
        [client],
    )
    p.add_argument("host", metavar="HOST", help="the server's host name or address")
    p.add_argument("port", metavar="PORT", type=_port, help="the server's port (1-65535)")
    p.add_argument("message", metavar="MESSAGE", help="the message ('-': read it from stdin)")
    p.add_argument(
        "--raw",
        action="store_true",
        help="write the reply's bytes as they are (not to a terminal: there control "
        "characters stay escaped, unless --raw-terminal)",
    )
    p.add_argument(
        "--raw-terminal",
        action="store_true",
        help="with --raw: write the bytes even to a terminal (a hostile server's escape "
        "sequences then reach it)",
    )
    _protocol_option(p, "talk to a Callcp 1.0 server")
    p.set_defaults(func=cmd_send)

    # -- send-file
    p = add(
        "send-file",
        "send a file to a server started with --receive-dir",
        "Stream a file of any size to a server started with --receive-dir, with a\n"
        "progress display (a rich progress bar on a terminal, else one line per\n"
        "second), then check the server's confirmation: its SHA-256 of what it\n"
        "stored must match the file's (a mismatch exits with code 6).",
        [client],
    )
    p.add_argument("host", metavar="HOST", help="the server's host name or address")
    p.add_argument("port", metavar="PORT", type=_port, help="the server's port (1-65535)")
    p.add_argument("path", metavar="PATH", help="the file to send")
    p.add_argument(
        "--name",
        type=_stream_name,
        help="the name to store it under (default: the file's base name)",
    )
    p.set_defaults(func=cmd_send_file)

    # -- keygen
    p = add(
        "keygen",
        "generate an RSA key pair and print its fingerprint",
        "Generate an RSA key pair: the private key goes to PATH (PKCS#8 PEM, mode\n"
        "0600, written atomically), the public key next to it as '<stem>.pub.pem'\n"
        "(server_key.pem -> server_key.pub.pem) or to --public. Existing files are\n"
        "never overwritten without --force. The private key is encrypted when the\n"
        f"environment variable {PASSPHRASE_ENV} is set. Prints the key's fingerprint.",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        default=str(DEFAULT_SERVER_KEY),
        help=f"private key file (default: {DEFAULT_SERVER_KEY})",
    )
    p.add_argument(
        "--public", metavar="PATH", help="public key file (default: <stem of PATH>.pub.pem)"
    )
    p.add_argument(
        "--bits",
        type=int,
        choices=(2048, 3072, 4096),
        default=2048,
        help="RSA key size (default: 2048)",
    )
    p.add_argument("--force", action="store_true", help="replace existing key files")
    p.add_argument(
        "--pkcs11",
        metavar="URI",
        help="generate the key in a PKCS#11 token instead of a file, named by URI "
        "(pkcs11:token=...;object=LABEL?module-name=...&pin-source=file:...); the private "
        "key never leaves the token; prints the URI to use as --key (needs python-pkcs11)",
    )
    p.add_argument(
        "--next",
        action="store_true",
        help=f"make the key the server will use next: {DEFAULT_NEXT_KEY} unless -o is "
        "given (announce it with serve --next-key; switch to it later with --key)",
    )
    p.add_argument(
        "--ticket-key",
        metavar="FILE",
        help="make a session ticket key file instead (32 random bytes as hex, mode 0600): "
        "give the same file to every server that should resume the others' sessions "
        "(serve --ticket-key FILE)",
    )
    p.add_argument(
        "--rotate",
        action="store_true",
        help=f"with --ticket-key: put a new key first in FILE (it seals new tickets) and keep "
        f"the previous ones after it (their tickets still open), {TICKET_KEYS_KEPT} keys at "
        "most; running servers read the file again within a second",
    )
    p.set_defaults(func=cmd_keygen)

    # -- fingerprint
    p = add(
        "fingerprint",
        "print the SHA256 fingerprint of a key file, or of a server's key",
        "Print the SHA256: fingerprint of a PEM private or public key file (default:\n"
        f"{DEFAULT_SERVER_KEY}), the form --fingerprint and known_hosts use.\n"
        "With --remote HOST PORT, print the key a running server PRESENTS. That is\n"
        "not a verification: compare it with `callcp fingerprint` run on the server\n"
        "(or obtained over another trusted channel) before pinning it.",
    )
    p.add_argument("path", metavar="PATH", nargs="?", help="a PEM key file, or a pkcs11: URI")
    p.add_argument(
        "--remote",
        nargs=2,
        metavar=("HOST", "PORT"),
        help="ask a running server for its key (not verified)",
    )
    p.add_argument(
        "--timeout",
        metavar="S",
        type=_seconds,
        default=30.0,
        help="with --remote: seconds to wait (default: 30)",
    )
    p.set_defaults(func=cmd_fingerprint)

    # -- known-hosts
    p = add(
        "known-hosts",
        "list, add, remove or revoke the server keys this client trusts",
        f"Manage the known-hosts file (default: {DEFAULT_KNOWN_HOSTS}): one line per\n"
        "host:port and key. IP addresses are matched in one canonical form, so 127.1,\n"
        "0x7f.0.0.1 and ::ffff:127.0.0.1 all mean 127.0.0.1; host names are matched as\n"
        "given (lower-cased): localhost is not 127.0.0.1. Write IPv6 addresses with a\n"
        "port in brackets: [::1]:8436.",
    )
    p.add_argument(
        "--known-hosts",
        metavar="FILE",
        help=f"known-hosts file (default: {DEFAULT_KNOWN_HOSTS})",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", title="actions")
    actions.required = True
    actions.add_parser("list", help="print every entry (malformed lines go to stderr)")
    a = actions.add_parser("remove", help="remove the entries of HOST (one PORT, or every port)")
    a.add_argument("address", metavar="HOST[:PORT]")
    a = actions.add_parser("add", help="trust FINGERPRINT for HOST:PORT (replacing its keys)")
    a.add_argument("address", metavar="HOST[:PORT]", help=f"(default port: {DEFAULT_PORT})")
    a.add_argument("fingerprint", metavar="FINGERPRINT")
    a = actions.add_parser("revoke", help="refuse FINGERPRINT from every server, loudly")
    a.add_argument("fingerprint", metavar="FINGERPRINT")
    a.add_argument(
        "--host", metavar="HOST[:PORT]", help="refuse it only from this server (default: all)"
    )
    p.set_defaults(func=cmd_known_hosts)

    # -- bench: its options are the harness's (main() hands them over unparsed)
    sub.add_parser(
        "bench",
        help="compare callcp with Python's ssl (TLS 1.3) and raw TCP (from a source checkout)",
        add_help=False,
    ).set_defaults(func=cmd_bench)
    return parser


# ====================================================================== output


def _say(text: str = "", *, file: Any = None) -> None:
    print(text, file=file if file is not None else sys.stdout, flush=True)


def _note(args: argparse.Namespace, text: str) -> None:
    """An informational line on stderr (hidden by -q)."""
    if not args.quiet:
        _say(text, file=sys.stderr)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _addr(host: Any, port: Any) -> str:
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class _CliFormatter(logging.Formatter):
    """``callcp: warning: ...`` for clients; timestamped lines for ``serve``."""

    def __init__(self, timestamps: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s" if timestamps else None)
        self._timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        if self._timestamps:
            return super().format(record)
        text = f"callcp: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


@contextlib.contextmanager
def _logging(args: argparse.Namespace) -> Iterator[None]:
    """Log to stderr while the command runs, then leave logging as it was
    (:func:`main` may run more than once in a process, e.g. in tests)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CliFormatter(timestamps=args.command == "serve"))
    root = logging.getLogger()
    saved = root.level, log.level
    if args.verbose >= 2:
        level = logging.DEBUG
    elif args.verbose == 1:
        level = logging.INFO
    else:
        level = logging.ERROR if args.quiet else logging.WARNING
    root.addHandler(handler)
    root.setLevel(level)
    log.setLevel(logging.WARNING if args.quiet else min(level, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        log.setLevel(saved[1])


def _silent_logger() -> logging.Logger:
    """A logger that drops everything (for --insecure, which warns on its own)."""
    silent = logging.getLogger("callcp.cli.silent")
    silent.propagate = False
    if not silent.handlers:
        silent.addHandler(logging.NullHandler())
    return silent


# ====================================================================== client


def _connect(args: argparse.Namespace) -> Connection:
    logger: Optional[logging.Logger] = None
    if args.insecure:
        _say(
            "callcp: WARNING: --insecure: the server's key is NOT checked. The connection "
            f"is encrypted, but anyone on the network path can impersonate "
            f"{_addr(args.host, args.port)} and read or change everything sent. Pin the "
            "server's key with --fingerprint instead (see `callcp fingerprint`).",
            file=sys.stderr,
        )
        if not args.verbose:
            logger = _silent_logger()  # the library's own warning would repeat ours
    return callcp.connect(
        args.host,
        args.port,
        timeout=args.timeout or None,
        server_fingerprint=args.fingerprint,
        known_hosts=args.known_hosts,
        trust_on_first_use=not args.no_tofu,
        insecure=args.insecure,
        client_key=args.client_key,
        allow_insecure_permissions=args.insecure_key_permissions,
        protocol=getattr(args, "protocol", CALLCP2),
        logger=logger,
    )


def cmd_send(args: argparse.Namespace) -> int:
    if args.message == "-":
        message = sys.stdin.buffer.read()
    else:
        message = args.message.encode("utf-8", "surrogateescape")
    with _connect(args) as conn:
        reply = conn.request(message)
    if args.raw and (args.raw_terminal or not sys.stdout.isatty()):
        sys.stdout.buffer.write(reply)
        sys.stdout.buffer.flush()
        return EXIT_OK
    if args.raw:
        _note(
            args,
            "callcp: note: stdout is a terminal: the reply's control characters are shown "
            "escaped (--raw-terminal writes them as they are)",
        )
    _say(terminal_text(reply.decode("utf-8", "replace")))
    return EXIT_OK


def terminal_text(text: str) -> str:
    """The peer's text made safe for a terminal: newlines and tabs kept, every
    other character that is not printable (escape sequences, carriage
    returns, C1 controls, bidi and other format characters) shown escaped,
    so a server cannot retitle the window, clear the screen, write the
    clipboard or rewrite a line already shown.  (A reply of several lines is
    shown as several lines: what they say is the server's.)"""
    return "\n".join(
        "\t".join(printable(part) for part in line.split("\t")) for line in text.split("\n")
    )


class _PlainProgress:
    """``sent N/TOTAL bytes (P%)`` at most once a second, plus a final line."""

    def __init__(self, total: Optional[int], interval: float = 1.0) -> None:
        self.total = total
        self.interval = interval
        self.start = self.last = time.monotonic()
        self.done = 0

    def _line(self, done: int) -> str:
        if self.total:
            return f"sent {done}/{self.total} bytes ({done * 100 // self.total}%)"
        return f"sent {done} bytes"

    def __call__(self, done: int, total: Optional[int]) -> None:
        self.done = done
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            _say(self._line(done))

    def finish(self) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = self.done / elapsed / (1 << 20)
        _say(f"{self._line(self.done)} in {elapsed:.1f} s ({rate:.1f} MiB/s)")


@contextlib.contextmanager
def _progress(
    args: argparse.Namespace, name: str, total: Optional[int]
) -> Iterator[Optional[Callable[[int, Optional[int]], None]]]:
    """The progress callback for send_stream: rich on a terminal, else plain lines."""
    if args.quiet:
        yield None
        return
    if not args.no_display and sys.stdout.isatty():
        try:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
        except ImportError:
            pass
        else:
            with Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
            ) as bar:
                task = bar.add_task(name, total=total)
                yield lambda done, _total: bar.update(task, completed=done)
            return
    plain = _PlainProgress(total)
    yield plain
    plain.finish()


def _parse_stored(reply: bytes) -> Optional[Tuple[str, int, str]]:
    """``stored <name> <length> <sha256hex>`` -> (name, length, hex), else None."""
    text = reply.decode("utf-8", "replace")
    if not text.startswith(STORED_PREFIX):
        return None
    parts = text[len(STORED_PREFIX) :].rsplit(" ", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not re.fullmatch(r"[0-9a-f]{64}", parts[2]):
        return None
    return parts[0], int(parts[1]), parts[2]


def _refused(args: argparse.Namespace, exc: ConnectionClosed, what: str) -> CommandError:
    where = _addr(args.host, args.port)
    if exc.code == CloseCode.REFUSED:
        return CommandError(
            f"the server at {where} refused the file: {exc.reason or 'no reason given'}",
            EXIT_PROTOCOL,
        )
    if exc.code is None:
        return CommandError(
            f"the connection to {where} broke {what} ({_one_line(str(exc))}); servers "
            "started without --receive-dir refuse files: see the server's log",
            EXIT_NETWORK,
        )
    return CommandError(f"{_one_line(str(exc))} ({what})", _exit_code_for_close(exc.code))


def cmd_send_file(args: argparse.Namespace) -> int:
    path = Path(args.path)
    name = args.name if args.name is not None else path.name
    problem = _name_problem(name)
    if problem is not None:
        raise CommandError(
            f"cannot send the name {name!r}: {problem}; choose one with --name", EXIT_USAGE
        )
    # Open the file before connecting: a wrong path fails fast and offline.
    with open(path, "rb") as source:
        st = os.fstat(source.fileno())
        size = st.st_size if stat.S_ISREG(st.st_mode) else None
        with _connect(args) as conn:
            try:
                with _progress(args, name, size) as progress:
                    sent = conn.send_stream(source, name=name, progress=progress, checksum=True)
            except ConnectionClosed as exc:
                raise _refused(args, exc, "while the file was being sent") from exc
            try:
                reply = conn.recv()
            except ConnectionClosed as exc:
                raise _refused(args, exc, "before confirming the file") from exc
    stored = _parse_stored(reply)
    if stored is None:
        shown = reply[:80].decode("utf-8", "replace")
        raise CommandError(
            f"unexpected reply from the server (not a 'stored' confirmation): {shown!r}; "
            "is it a callcp server started with --receive-dir?",
            EXIT_PROTOCOL,
        )
    remote_name, remote_length, remote_sha = stored
    if remote_sha != sent.sha256 or remote_length != sent.length:
        raise CommandError(
            f"INTEGRITY ERROR: the server stored {remote_length} bytes with SHA-256 "
            f"{remote_sha}, but {sent.length} bytes with SHA-256 {sent.sha256} were sent",
            EXIT_PROTOCOL,
        )
    if not args.quiet:
        _say(f"stored as {remote_name!r} on {_addr(args.host, args.port)} ({sent.length} bytes)")
    _say(f"remote SHA-256 matches: {sent.sha256}")
    return EXIT_OK


# ====================================================================== keys


def _public_path_for(private: Path) -> Path:
    stem = private.name[:-4] if private.name.endswith(".pem") else private.name
    return private.with_name(stem + ".pub.pem")


def _keygen_in_token(args: argparse.Namespace) -> int:
    if args.output != str(DEFAULT_SERVER_KEY) or args.force or args.next:
        raise CommandError(
            "--pkcs11 names the key by its URI: -o, --next and --force do not apply "
            "(callcp never replaces a key in a token)",
            EXIT_USAGE,
        )
    from .hsm import generate_key

    key = generate_key(args.pkcs11, args.bits)
    keypair = KeyPair(key)
    uri = str(replace(key.uri, pin_source=None, module_path=None, module_name=None))
    if args.public:
        public = Path(os.path.expanduser(args.public))
        if not _write_new(public, keypair.public_pem(), 0o644, "public key"):
            raise CommandError(f"{public} already exists; not overwriting it", EXIT_LOCAL)
    if not args.quiet:
        token = printable(key.token_label)
        _say(f"private key: {printable(uri)} (RSA {keypair.key_size}, in token {token})")
        if args.public:
            _say(f"public key:  {args.public}")
    _say(f"fingerprint: {keypair.fingerprint}" if not args.quiet else keypair.fingerprint)
    return EXIT_OK


#: Keys a ticket key file keeps across rotations: the current one and the
#: previous ones, whose tickets a server still opens.
TICKET_KEYS_KEPT = 3
TICKET_FILE_HEADER = (
    "# callcp session ticket keys: the first line seals new tickets, every line opens them.\n"
    "# Secret: keep it private (mode 0600), the same file on every server.\n"
)


def _ticket_keys_kept(path: Path) -> List[bytes]:
    """The keys a rotation keeps (the file keeps its owner, group and mode:
    whose it is does not matter here, as it does to a server reading it)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror or exc}", EXIT_LOCAL) from None
    try:
        keys = parse_ticket_keys(data)
    except ValueError as exc:
        raise CommandError(f"{path}: {exc}", EXIT_LOCAL) from None
    if keys is None:
        if len(data) < 32:
            raise CommandError(f"{path} holds {len(data)} bytes: not a ticket key", EXIT_LOCAL)
        keys = [data]
    return keys


def _keygen_ticket(args: argparse.Namespace) -> int:
    shown = Path(os.path.expanduser(args.ticket_key))
    path = shown
    if args.rotate or args.force:  # (through a link: the file it names, shared, is changed)
        path = Path(os.path.realpath(shown))
    with _rotation_lock(path if args.rotate else None):
        return _write_ticket_keys(args, shown, path)


@contextlib.contextmanager
def _rotation_lock(path: Optional[Path]) -> Iterator[None]:
    """(--rotate) One rotation of a file at a time: two at once would each
    keep the keys they read, and one new key would be lost.  An advisory
    lock on ``<file>.lock`` beside it."""
    if path is None:
        yield
        return
    import fcntl

    try:
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise CommandError(
            f"cannot lock {path} for its rotation: {exc.strerror or exc}", EXIT_LOCAL
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_ticket_keys(args: argparse.Namespace, shown: Path, path: Path) -> int:
    new = os.urandom(32)
    if args.rotate:
        kept = _ticket_keys_kept(path)
        keys = [new, *kept][:TICKET_KEYS_KEPT]
    else:
        keys = [new]
    data = (TICKET_FILE_HEADER + "".join(ticket_key_line(key) + "\n" for key in keys)).encode()
    if args.rotate or args.force:
        tmp = _write_temp(path, data, 0o600)
        try:
            if args.rotate:  # (the file stays whose it was, and as readable: 0640 at most)
                st = path.stat()
                if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                    os.chown(tmp, st.st_uid, st.st_gid)
                os.chmod(tmp, stat.S_IMODE(st.st_mode) & 0o640)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise CommandError(
                f"cannot rotate {path}: {exc.strerror or exc} (its owner, or root, can)",
                EXIT_LOCAL,
            ) from None
    elif not _write_new(path, data, 0o600, "ticket key file"):
        raise CommandError(
            f"{path} already exists; not overwriting it (--rotate adds a new key and keeps "
            "the others; --force replaces the file: tickets sealed under it no longer open)",
            EXIT_LOCAL,
        )
    if args.quiet:
        pass
    elif args.rotate:
        _say(f"ticket key file: {shown}: a new key first, {len(keys) - 1} previous kept")
    else:
        _say(f"ticket key file: {shown} (mode 0600): give it to every server (--ticket-key)")
    return EXIT_OK


def cmd_keygen(args: argparse.Namespace) -> int:
    if args.rotate and args.ticket_key is None:
        raise CommandError("--rotate goes with --ticket-key FILE", EXIT_USAGE)
    if args.ticket_key is not None:
        return _keygen_ticket(args)
    if args.pkcs11 is not None:
        return _keygen_in_token(args)
    if args.next and args.output == str(DEFAULT_SERVER_KEY):
        args.output = str(DEFAULT_NEXT_KEY)
    private = Path(os.path.expanduser(args.output))
    public = Path(os.path.expanduser(args.public)) if args.public else _public_path_for(private)
    if private == public:
        raise CommandError("the private and public key paths must differ", EXIT_USAGE)
    if not args.force:
        for existing in (private, public):
            if os.path.lexists(existing):
                raise CommandError(
                    f"{existing} already exists; not overwriting it (--force replaces it; "
                    "whoever trusts the old key, a client that knows a server's key or a "
                    "server that lists a client's, will then refuse the new one)",
                    EXIT_LOCAL,
                )
    keypair = KeyPair.generate(args.bits)
    keypair.save(private, public)
    if not args.quiet:
        encrypted = f", encrypted with ${PASSPHRASE_ENV}" if os.environ.get(PASSPHRASE_ENV) else ""
        _say(f"private key: {private} (RSA {keypair.key_size}, mode 0600{encrypted})")
        _say(f"public key:  {public}")
    _say(f"fingerprint: {keypair.fingerprint}" if not args.quiet else keypair.fingerprint)
    return EXIT_OK


def _host_port(text: str, default: Optional[int]) -> Tuple[str, Optional[int]]:
    """``HOST``, ``HOST:PORT``, ``[V6]:PORT`` or a bare IPv6 address."""
    port_text: Optional[str] = None
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1 :] if end > 0 else "?"
        if end < 0 or (rest and not rest.startswith(":")):
            raise CommandError(f"not HOST[:PORT]: {text!r} (IPv6: [::1]:8436)", EXIT_USAGE)
        host, port_text = text[1:end], rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host = text
    if port_text is None:
        return host, default
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise CommandError(f"invalid port {port_text!r} in {text!r}", EXIT_USAGE)
    return host, int(port_text)


def _line_text(item: Any) -> str:
    """One known-hosts line for the terminal (escaped: the file may hold anything)."""
    if isinstance(item, KnownHostsEntry):
        mark = "@revoked " if item.revoked else ""
        return printable(f"{mark}{item.address} {item.fingerprint}")
    return printable(f"line {item.lineno} (malformed: {item.reason}): {item.text.strip()}")


def cmd_known_hosts(args: argparse.Namespace) -> int:
    path = _known_hosts_path(args)
    kh = KnownHosts(path)
    try:
        if args.action == "list":
            items = kh.entries()
            for item in items:
                if isinstance(item, KnownHostsEntry):
                    _say(_line_text(item))
                else:
                    _say(f"callcp: warning: {path}: {_line_text(item)}", file=sys.stderr)
            if not items:
                _note(args, f"no known hosts in {path}")
        elif args.action == "remove":
            host, port = _host_port(args.address, None)
            gone = kh.remove(host, port)
            for item in gone:
                _say(f"removed {_line_text(item)}")
            if not gone:
                _note(args, f"no entry for {printable(args.address)} in {path}")
        elif args.action == "add":
            host, port = _host_port(args.address, DEFAULT_PORT)
            assert port is not None
            fp = normalize_fingerprint(args.fingerprint)
            before = kh.lookup(host, port)
            kh.add(host, port, fp)
            address = format_address(host, port)
            replaced = f" (replacing {before})" if before and before != fp else ""
            _say(f"added {address} {fp}{replaced}")
        else:  # revoke
            fp = normalize_fingerprint(args.fingerprint)
            if args.host is None:
                added, where = kh.revoke(fp), "every server"
            else:
                host, port = _host_port(args.host, DEFAULT_PORT)
                added, where = kh.revoke(fp, host, port), format_address(host, port or 0)
            _say(f"revoked {fp} for {where}" + ("" if added else " (it already was)"))
    except (ValueError, TypeError) as exc:
        raise CommandError(_one_line(str(exc)), EXIT_USAGE) from None
    return EXIT_OK


def _file_fingerprint(path: Path) -> str:
    """The fingerprint of a PEM private key file, else of a PEM public key
    file; for an encrypted private key without its passphrase, that of the
    public key file beside it (``<stem>.pub.pem``)."""
    try:
        # (printing a fingerprint exposes nothing: loose permissions only warn)
        return KeyPair.load(path, allow_insecure_permissions=True).fingerprint
    except KeyManagementError as private_error:
        if "no passphrase was given" in str(private_error):
            public = _public_path_for(path)
            if public.is_file():
                fp = callcp.fingerprint(load_public_key(public))
                _say(f"callcp: note: {path} is encrypted: this is {public}'s key", file=sys.stderr)
                return fp
            raise CommandError(
                f"{path} is an encrypted private key: set {PASSPHRASE_ENV} to its passphrase "
                "(or give its public key file)",
                EXIT_LOCAL,
            ) from None
        try:
            return callcp.fingerprint(load_public_key(path))
        except KeyManagementError as public_error:
            # Report what the file seems to be: the private-key error, unless it
            # said the file holds a public key.
            if "holds a public key" in str(private_error):
                raise public_error from None
            raise private_error from None


def cmd_fingerprint(args: argparse.Namespace) -> int:
    if args.remote is None and is_pkcs11_uri(args.path):
        _say(KeyPair.from_pkcs11(args.path, allow_insecure_permissions=True).fingerprint)
        return EXIT_OK
    if args.remote is None:
        path = Path(os.path.expanduser(args.path or DEFAULT_SERVER_KEY))
        try:
            _say(_file_fingerprint(path))
        except KeyManagementError as exc:
            if args.path is None and not os.path.lexists(path):
                raise CommandError(
                    f"no key at {path}: generate one with `callcp keygen` (or run "
                    "`callcp serve`), or give the key file's path",
                    EXIT_LOCAL,
                ) from exc
            raise
        return EXIT_OK
    if args.path is not None:
        raise CommandError("give either PATH or --remote HOST PORT, not both", EXIT_USAGE)
    host, port_text = args.remote
    try:
        port = _port(port_text)
    except argparse.ArgumentTypeError as exc:
        raise CommandError(f"argument --remote: {exc}", EXIT_USAGE) from None
    args.host, args.port = host, port  # for error messages
    logger = None if args.verbose else _silent_logger()
    with callcp.connect(
        host, port, insecure=True, timeout=args.timeout or None, logger=logger
    ) as conn:
        conn.do_handshake(confirm=True)  # the server proves it holds the key it presents
        presented = conn.peer_fingerprint
    if presented is None:  # pragma: no cover - set once the server's Finished verified
        raise CommandError("the server presented no key", EXIT_PROTOCOL)
    _say(presented)
    _note(
        args,
        f"note: this is the key the server at {_addr(host, port)} PRESENTS; it was NOT "
        "verified. Compare it with `callcp fingerprint` run on the server before pinning "
        "it with --fingerprint.",
    )
    return EXIT_OK


# ====================================================================== server


def _upper(message: bytes) -> bytes:
    return message.decode("utf-8", "surrogateescape").upper().encode("utf-8", "surrogateescape")


def _refuse(conn: Connection, pending: StreamPending, reason: str, peer: str) -> None:
    """Close the connection with REFUSED and ``reason`` (the sender reads
    the refusal even while its upload is still under way)."""
    log.warning("refused a file from %s: %s", peer, reason)
    conn.close(CloseCode.REFUSED, reason)


def _receive_file(
    conn: Connection, pending: StreamPending, inbox: Optional[Inbox], peer: str
) -> bool:
    """Store the pending stream (or refuse it); False when the connection is done."""
    if inbox is None:
        _refuse(conn, pending, REFUSE_FILES_REASON, peer)
        return False
    name = safe_file_name(pending.name)
    if name is None:
        _refuse(conn, pending, f"unsafe file name {printable(pending.name[:100])!r}", peer)
        return False
    source = str(conn.remote_address[0]) if conn.remote_address else ""
    try:
        slot = inbox.admit(name, pending.size, source)
    except Refused as exc:
        _refuse(conn, pending, str(exc), peer)
        return False
    except OSError as exc:
        log.error("cannot store a file from %s in %s: %s", peer, inbox.directory, exc)
        _refuse(conn, pending, "the server cannot store files right now", peer)
        return False
    try:
        info = conn.recv_stream(slot.file, max_size=slot.max_size, progress=slot.progress)
        path = slot.commit(info.length)
    except StreamAbortedError as exc:
        slot.discard()
        log.warning(
            "%s abandoned the file %r: %s", peer, name, printable(exc.reason) or "no reason"
        )
        return True
    except StreamTooLarge as exc:  # recv_stream refused it (REFUSED, with the reason)
        slot.discard()
        log.warning("refused a file from %s: %s", peer, exc)
        return False
    except OSError as exc:  # recv_stream closed the connection
        slot.discard()
        log.error("could not store %r (from %s) in %s: %s", name, peer, inbox.directory, exc)
        return False
    except BaseException:
        slot.discard()
        raise
    log.info("received %r (%d bytes, sha256 %s) from %s", path.name, info.length, info.sha256, peer)
    conn.send(f"{STORED_PREFIX}{path.name} {info.length} {info.sha256 or '-'}".encode())
    return True


def _make_handler(upper: bool, inbox: Optional[Inbox]) -> Callable[[Connection], None]:
    def handle(conn: Connection) -> None:
        peer = _addr(*conn.remote_address[:2]) if conn.remote_address else "?"
        while True:
            try:
                message = conn.recv()
            except StreamPending as pending:
                if not _receive_file(conn, pending, inbox, peer):
                    return
                continue
            conn.send(_upper(message) if upper else message)

    return handle


def make_server(args: argparse.Namespace) -> callcp.Server:
    """The server ``callcp serve`` runs for these parsed arguments, listening
    already (``serve_forever()`` serves).

    Raises:
        CommandError: ``--receive-dir`` is not a directory.
        OSError, CallcpError: as :func:`callcp.serve`.
    """
    inbox: Optional[Inbox] = None
    if args.protocol == CALLCP1:
        for name, given, lacks in (
            ("--receive-dir", args.receive_dir, "no streams"),
            ("--authorized-keys", args.authorized_keys, "no client keys"),
            ("--next-key", args.next_key, "no way to announce a key"),
        ):
            if given is not None:
                raise CommandError(
                    f"{name} needs callcp/2: Callcp 1.0 has {lacks} (run a callcp/2 server "
                    "beside this one, on another port)",
                    EXIT_USAGE,
                )
    if args.receive_dir is not None:
        receive_dir = Path(os.path.expanduser(args.receive_dir))
        limits = InboxLimits(
            max_file_size=args.max_file_size,
            max_total_size=args.max_total_size,
            max_files=args.max_files,
            min_free_space=args.min_free_space,
        )
        try:
            inbox = Inbox.open(receive_dir, limits)
        except NotADirectoryError:
            raise CommandError(
                f"--receive-dir {receive_dir} is not a directory", EXIT_LOCAL
            ) from None
        except OSError as exc:
            raise CommandError(
                f"cannot store files in --receive-dir {receive_dir}: "
                f"{(exc.strerror or str(exc)).lower()} (give a directory this user can write)",
                EXIT_LOCAL,
            ) from None
    key = os.path.expanduser(args.key if args.key else str(DEFAULT_SERVER_KEY))
    first_run = not is_pkcs11_uri(key) and not os.path.lexists(key)
    options: Dict[str, Any] = {
        "key": key,
        "next_key": os.path.expanduser(args.next_key) if args.next_key else None,
        "authorized_keys": os.path.expanduser(args.authorized_keys)
        if args.authorized_keys
        else None,
        "max_message_size": args.max_message_size,
        "handshake_timeout": args.handshake_timeout,
        "max_connections": args.max_connections,
        "max_connections_per_source": args.max_connections_per_source,
        "max_handshakes_per_source": args.max_handshakes_per_source,
        "shutdown_timeout": args.shutdown_timeout,
        "keepalive_interval": args.keepalive_interval or None,
        "ticket_lifetime": args.ticket_lifetime,
        "workers": args.workers,
        "allow_insecure_permissions": args.insecure_key_permissions or None,
        "protocol": args.protocol,
        "ticket_key": os.path.expanduser(args.ticket_key) if args.ticket_key else None,
        "proxy_protocol": args.proxy_protocol or None,
        "trusted_proxies": args.trusted_proxy or None,
    }
    options = {k: v for k, v in options.items() if v is not None}
    if args.idle_timeout is not None:
        options["idle_timeout"] = args.idle_timeout or None
    try:
        server = callcp.serve(_make_handler(args.upper, inbox), args.host, args.port, **options)
    except ValueError as exc:  # (an option's value, or a combination: in the command's terms)
        text = str(exc)
        for name, flag in _OPTION_FLAGS:
            text = text.replace(name, flag)
        raise CommandError(text, EXIT_USAGE) from None
    if first_run and os.path.exists(key):
        # The key was made now: said, with its public half beside it (a
        # server's identity is not something to make silently).
        public = _public_path_for(Path(key))
        KeyPair.load_or_generate(key, public, allow_insecure_permissions=True)
        log.info(
            "generated a new server key %s in %s (public key: %s)", server.fingerprint, key, public
        )
    return server


#: ServerOptions' names in their errors, and the `callcp serve` flags they are.
_OPTION_FLAGS = (
    ("proxy_protocol=True", "--proxy-protocol"),
    ("trusted_proxies", "--trusted-proxy"),
    ("ticket_key", "--ticket-key"),
    ("shutdown_timeout", "--shutdown-timeout"),
    ("ticket_lifetime", "--ticket-lifetime"),
    ("keepalive_interval", "--keepalive-interval"),
    ("protocol='callcp1'", "--protocol callcp1"),
)


def _reload_soon(allowed: Any) -> None:
    """(a SIGHUP handler) Re-read the allow list in a thread of its own: the
    handler itself must not wait (on the file, or on the list's lock, which
    an earlier SIGHUP's reload may hold)."""
    threading.Thread(target=allowed.reload, name="callcp-reload", daemon=True).start()


def cmd_serve(args: argparse.Namespace) -> int:
    server = make_server(args)
    # Ctrl-C and SIGTERM: a graceful shutdown; SIGHUP: re-read the allow list
    # now.  Both are in place before "listening" is printed, so a signal sent
    # as soon as it shows is handled (signal handlers can only be set from
    # the main thread; main() may run in another one).
    main_thread = threading.current_thread() is threading.main_thread()
    signals = _stopping_on_signals() if main_thread else contextlib.nullcontext()
    allowed = server._core.authorized_keys
    hangup: Any = None
    try:
        with signals:
            if main_thread and allowed is not None:
                hangup = signal.signal(signal.SIGHUP, lambda signum, frame: _reload_soon(allowed))
            host, port = server.server_address[:2]
            legacy = " speaking Callcp 1.0 (--protocol callcp1)" if args.protocol == CALLCP1 else ""
            _say(f"listening on {_addr(host, port)} (server key {server.fingerprint}){legacy}")
            if args.receive_dir is not None:
                log.info("storing received files in %s", os.path.expanduser(args.receive_dir))
            server.serve_forever(handle_signals=main_thread)
            log.info("shutting down")  # (a signal stopped it)
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        server.shutdown()
        if hangup is not None:
            signal.signal(signal.SIGHUP, hangup)
    return EXIT_OK


# ====================================================================== bench


#: The harness module in the repository's benchmarks/ directory.
BENCH_MODULE = "callcp_bench"
NO_BENCHMARKS = (
    "callcp bench needs a source checkout: the benchmarks live in the source repository's "
    "benchmarks/ directory, not in the installed package (run python benchmarks/run.py "
    "from a clone of the repository)"
)


def benchmarks_dir() -> Optional[Path]:
    """The benchmarks/ directory of the checkout this callcp runs from (an
    editable install, or src/ on the path), or None for an installed package.
    Only that one place is looked at: never the current directory."""
    directory = Path(__file__).resolve().parents[2] / "benchmarks"  # <repo>/src/callcp/cli.py
    return directory if (directory / f"{BENCH_MODULE}.py").is_file() else None


def cmd_bench(args: argparse.Namespace) -> int:
    directory = benchmarks_dir()
    if directory is None:
        raise CommandError(NO_BENCHMARKS, EXIT_USAGE)
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))  # the harness's spawned processes import it too
    harness = importlib.import_module(BENCH_MODULE)
    argv = [*(["--quiet"] if args.quiet else []), *(["-v"] if args.verbose else [])]
    return int(harness.main([*argv, *args.bench_args], prog="callcp bench"))


# ====================================================================== errors


def _exit_code_for_close(code: Optional[int]) -> int:
    return EXIT_PROTOCOL if code in _PROTOCOL_CLOSE_CODES else EXIT_NETWORK


def _known_hosts_path(args: argparse.Namespace) -> str:
    return os.path.expanduser(getattr(args, "known_hosts", None) or DEFAULT_KNOWN_HOSTS)


def _explain(exc: BaseException, args: argparse.Namespace) -> Tuple[int, str]:
    """(exit code, one-line message) for an error that ended a command."""
    host: Any = getattr(args, "host", None)
    port: Any = getattr(args, "port", None)
    where = _addr(host, port) if host is not None else "the server"
    text = _one_line(str(exc))
    if isinstance(exc, CommandError):
        return exc.code, text
    if isinstance(exc, ServerKeyChanged):
        if getattr(args, "fingerprint", None):
            return EXIT_UNTRUSTED, (
                f"the server at {where} presented key {exc.presented}, but --fingerprint "
                f"pins {exc.expected}. Someone may be intercepting the connection, or the "
                "server's key was replaced; if that change is expected, pin the new fingerprint"
            )
        try:
            address = format_address(host, port) if host is not None else where
        except (ValueError, TypeError):
            address = where
        known = _known_hosts_path(args)
        return EXIT_UNTRUSTED, (
            f"the server key of {address} has CHANGED: it presented {exc.presented}, but "
            f"{known} records {exc.expected}. Someone may be intercepting the connection "
            "(man-in-the-middle), or the server's key was replaced. If the change is "
            f"expected, run `callcp known-hosts remove {address}` (file: {known}) and "
            f"connect again, or pin the new key with --fingerprint {exc.presented}"
        )
    if isinstance(exc, ServerKeyError):
        return EXIT_UNTRUSTED, text
    if isinstance(exc, HandshakeTimeout):
        return EXIT_NETWORK, f"{text} (is {where} a callcp server? is it overloaded?)"
    if isinstance(exc, ClientAuthError):
        if not getattr(args, "client_key", None):
            return EXIT_HANDSHAKE, (
                f"the server at {where} requires client authentication: pass --client-key "
                "PATH with a key listed in the server's --authorized-keys file"
            )
        return EXIT_HANDSHAKE, (
            f"the server at {where} refused this client ({text}); ask its operator to add "
            f"the key's fingerprint (callcp fingerprint {args.client_key}) to its "
            "--authorized-keys file"
        )
    if isinstance(exc, HandshakeError):
        return EXIT_HANDSHAKE, f"handshake with {where} failed: {text}"
    if isinstance(exc, (CryptoError, RemoteProtocolError, LocalProtocolError)):
        return EXIT_PROTOCOL, f"protocol error with {where}: {text}"
    if isinstance(exc, StreamAbortedError):
        return EXIT_PROTOCOL, text
    if isinstance(exc, ConnectionClosedOK):
        return EXIT_NETWORK, f"the server at {where} closed the connection without replying"
    if isinstance(exc, ConnectionClosed):
        if exc.code == CloseCode.MESSAGE_TOO_LARGE and args.command == "send":
            return EXIT_PROTOCOL, (
                f"{text}: send a large payload with `callcp send-file` (a stream, any size), "
                "or start the server with a larger --max-message-size"
            )
        return _exit_code_for_close(exc.code), text
    if isinstance(exc, CallcpTimeout):
        return EXIT_NETWORK, (
            f"{text} (is {where} reachable and the server running? --timeout waits longer)"
        )
    if isinstance(exc, TransportError):
        cause = exc.__cause__
        if isinstance(cause, ConnectionRefusedError):
            return EXIT_NETWORK, (
                f"nothing is listening on {where} (connection refused): is the server "
                "running, on that host and port?"
            )
        if isinstance(cause, socket.gaierror):
            return EXIT_NETWORK, f"cannot resolve host {host!r}: {cause.strerror}"
        if isinstance(cause, OSError) and args.command == "serve":
            if cause.errno == errno.EADDRINUSE:
                return EXIT_NETWORK, (
                    f"cannot listen on {where}: the address is already in use (is another "
                    "server running there? choose another --port)"
                )
            return EXIT_NETWORK, f"cannot listen on {where}: {cause.strerror or cause}"
        return EXIT_NETWORK, text
    if isinstance(exc, KeyManagementError):  # (the API's advice, in the command's terms)
        return EXIT_LOCAL, text.replace("pass password= or set ", "set ")
    if isinstance(exc, OSError):
        what = f"{exc.filename}: " if exc.filename is not None else ""
        return EXIT_LOCAL, f"{what}{exc.strerror.lower() if exc.strerror else text}"
    return EXIT_INTERNAL, (
        f"internal error: {type(exc).__name__}: {text} (run with -v for the traceback, "
        "and please report it)"
    )


def _fix_stdout() -> None:
    """Never fail to print a reply because the terminal's encoding lacks a character."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            with contextlib.suppress(ValueError, OSError):
                stream.reconfigure(errors="replace")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``callcp`` command; returns its exit code."""
    _fix_stdout()
    parser = build_parser()
    _parsing[:] = list(sys.argv[1:] if argv is None else argv)
    args, unparsed = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = unparsed  # the harness parses them
    elif unparsed:
        parser.error(f"unrecognized arguments: {' '.join(unparsed)}")
    with _logging(args):
        try:
            return int(args.func(args))
        except KeyboardInterrupt:
            _say("callcp: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader went away (callcp send ... | head): not worth a message.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_INTERNAL
        except Exception as exc:
            code, message = _explain(exc, args)
            if args.verbose:
                traceback.print_exc()
            _say(f"callcp: error: {printable(message)}", file=sys.stderr)
            return code
