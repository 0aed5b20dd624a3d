"""What counts as "this machine only": loopback hosts, origins and socket addresses.

Keyless mode (no relay keys, auth not disabled) is safe only while nothing but
programs on this machine can talk to relayd. Two things can break that, and both
are checked here (issue 11, item 3):

- DNS rebinding: a web page the user visits points its own host name at
  127.0.0.1, and the browser then sends relayd requests (a WebSocket too) that
  carry that name as ``Host`` and the page's ``Origin``. A loopback listener is not
  enough; the request must also be addressed to a loopback name, from a loopback
  origin (or from no browser page at all: no ``Origin``).
- Listeners relayd did not bind itself (systemd socket activation): the address
  in the config says nothing about them, so their real address is read back.

Loopback means 127.0.0.0/8, ``::1`` (also as ``::ffff:127.x.y.z``), the name
``localhost`` (RFC 6761 §6.3), and Unix sockets.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "is_loopback_address",
    "is_loopback_host",
    "is_loopback_name",
    "is_loopback_origin",
    "socket_label",
]


def _is_loopback_ip(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def is_loopback_name(host: str) -> bool:
    """A host name or address (no port, no brackets) naming this machine."""
    return host.lower() == "localhost" or _is_loopback_ip(host)


def is_loopback_host(value: str) -> bool:
    """A ``Host`` header (RFC 9110 §7.2: ``host[:port]``, IPv6 in brackets) naming
    this machine. Anything unparseable is not loopback."""
    value = value.strip()
    if value.startswith("["):
        inside, closed, rest = value[1:].partition("]")
        if not closed or (rest and not (rest.startswith(":") and _is_port(rest[1:]))):
            return False
        return ":" in inside and _is_loopback_ip(inside)
    host, _, port = value.partition(":")
    if not _is_port(port):
        return False  # also a bare IPv6 address without brackets
    return is_loopback_name(host)


def _is_port(text: str) -> bool:
    # An empty port is allowed after the colon (RFC 3986 §3.2.3).
    return text == "" or (text.isascii() and text.isdigit() and len(text) <= 5)


def is_loopback_origin(value: str) -> bool:
    """An ``Origin`` header (RFC 6454 §7) of a page served from this machine.

    ``null`` (sandboxed frames, ``file:`` pages, redirects across origins) names
    no origin at all, so it is not loopback.
    """
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or "@" in parts.netloc:
        return False
    if parts.path or parts.query or parts.fragment or not parts.hostname:
        return False
    return is_loopback_name(parts.hostname)


def is_loopback_address(family: int, address: Any) -> bool:
    """A socket's own address (``getsockname()``) reachable from this machine only."""
    if family == socket.AF_UNIX:
        return True
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
        return _is_loopback_ip(str(address[0]))
    return False


def socket_label(family: int, address: Any) -> str:
    """``http://127.0.0.1:8080``, ``http://[::]:8080`` or ``unix:/run/relayd.sock``."""
    if family == socket.AF_UNIX:
        name = address.decode() if isinstance(address, bytes) else str(address)
        return f"unix:{name or '(unnamed)'}"
    if isinstance(address, tuple):
        host = str(address[0])
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{address[1]}"
    return repr(address)
