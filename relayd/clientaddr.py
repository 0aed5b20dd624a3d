"""The client's address: the peer's own, or, from a trusted proxy, the one it reports.

Only a proxy relayd was told to trust (``[server] trusted_proxies``) may say who its
client is, through ``Forwarded`` (RFC 7239) or ``X-Forwarded-For``. Each proxy appends
the address it received the request from, so the list reads from the original
client on the left to the last hop on the right, and whatever a client wrote itself
sits on the far left. relayd reads from the right and takes the first address that
is not a trusted proxy: anything further left was written by someone it cannot
vouch for (docs/security.md#client-address). From any other peer the headers are
ignored, so a forged ``X-Forwarded-For`` changes nothing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

__all__ = ["UNIX_PEER", "TrustedProxies"]

# The entry of ``trusted_proxies`` that trusts peers on a Unix socket (a front
# proxy on the same machine), which have no address of their own.
UNIX_PEER: Final = "unix"
# A forwarded node that is not an address is reported as sent when it is one of
# RFC 7239's own (§6: "unknown", an obfuscated "_name"), cut to this length; any
# other text is reported as "unknown", so no odd text reaches a log line.
_MAX_NODE: Final = 64
_NAMED_NODE: Final = re.compile(r"unknown|_[A-Za-z0-9._-]+", re.IGNORECASE)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """The peers whose forwarding headers relayd believes."""

    __slots__ = ("_networks", "_unix")

    def __init__(self, entries: Iterable[str]) -> None:
        entries = tuple(entries)
        self._unix = UNIX_PEER in entries
        self._networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(e, strict=False) for e in entries if e != UNIX_PEER
        )

    def __bool__(self) -> bool:
        return self._unix or bool(self._networks)

    def trusts(self, address: str | None) -> bool:
        """Whether ``address`` (``""`` or None: a Unix-socket peer) is a trusted proxy."""
        if not address:
            return self._unix
        if not self._networks:
            return False  # no address to parse for an answer known already
        ip = _ip(address)
        return ip is not None and any(ip in network for network in self._networks)

    def client(
        self,
        peer: str | None,
        forwarded: Sequence[Mapping[str, str]],
        forwarded_for: Sequence[str],
    ) -> str:
        """The client's address for a request from ``peer`` carrying the parsed
        ``Forwarded`` elements and the ``X-Forwarded-For`` header values.
        ``Forwarded`` wins when both are present: it is the standard, and a proxy
        that writes it means it."""
        if not self or not self.trusts(peer):
            return peer or UNIX_PEER
        if forwarded:
            hops = [element["for"] for element in forwarded if "for" in element]
        else:
            hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
        hops = [hop for hop in hops if hop]
        for hop in reversed(hops):
            node = _node_address(hop)
            if node is None:  # what the trusted proxy said, as it said it
                return hop[:_MAX_NODE] if _NAMED_NODE.fullmatch(hop) else "unknown"
            if not self.trusts(node):
                return node
        # Every hop is a trusted proxy: the left-most is the closest to the client.
        if hops and (first := _node_address(hops[0])) is not None:
            return first
        return peer or UNIX_PEER


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1 for trust decisions
    return ip


def _node_address(node: str) -> str | None:
    """The address in a forwarded node: ``192.0.2.7``, ``192.0.2.7:4711``,
    ``[2001:db8::7]:4711``, ``2001:db8::7`` (RFC 7239 §6); None if it names none."""
    node = node.strip().strip('"')
    if node.startswith("["):
        host, _, _ = node[1:].partition("]")
    elif node.count(":") == 1:
        host, _, _ = node.partition(":")
    else:
        host = node
    ip = _ip(host)
    return None if ip is None else str(ip)
