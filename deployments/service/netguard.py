"""Where the service may send a request for a URL that a user gave it (webhooks): the SSRF guard.

A URL is accepted when its scheme is http or https, it carries no userinfo, its host is a canonical
IP literal or a DNS name, and every address the host resolves to is public. Not public: loopback,
private (RFC 1918, fc00::/7), link-local (169.254/16 with the cloud metadata address, fe80::/10),
shared CGNAT space (100.64/10), multicast, unspecified, reserved, documentation and benchmark ranges,
and IPv6 forms that carry one of those IPv4 addresses (IPv4-mapped, NAT64, 6to4). Hosts that a
browser or libc would read as an IPv4 address in another spelling (`2130706433`, `0x7f.1`,
`0177.0.0.1`, `127.1`, `0`) are refused outright: their meaning differs between parsers. Any port is
allowed.

The allow-list (`webhook_allow` in settings) lets internal receivers through: a CIDR admits the
addresses inside it, a host name admits that exact name whatever it resolves to.

`AddressPolicy.check` resolves once and returns the addresses it checked; the caller connects to one
of those (never resolving again), so a name that changes its answer between check and connect (DNS
rebinding) cannot reach what the check refused.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the addresses it resolves to, as strings; raises OSError when it does not resolve
Resolver = Callable[[str, int], list[str]]

_NOT_PUBLIC = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
        "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        "::/96",  # unspecified, loopback and the deprecated IPv4-compatible form
        "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "fc00::/7", "fe80::/10", "fec0::/10",
        "ff00::/8",
    )
]  # fmt: skip
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")
_NUMBER = re.compile(r"[0-9]+|0x[0-9a-f]*")


class Refused(ValueError):
    """The URL may not be requested; the message says why (it names the host, never the whole URL)."""


class NotResolved(Refused):
    """The host did not resolve (a typo, or DNS briefly away)."""


def system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _embedded_ipv4(addr: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address that an IPv6 address stands for (mapped, NAT64 or 6to4), if any."""
    if isinstance(addr, ipaddress.IPv4Address):
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return addr.sixtofour


def not_public(addr: IPAddress) -> str | None:
    """Why the address is not a public one (None when it is)."""
    inner = _embedded_ipv4(addr)
    if inner is not None:
        why = not_public(inner)
        return f"{addr} carries {inner}: {why}" if why else None
    if addr.is_loopback:
        return f"{addr} is a loopback address"
    if addr.is_link_local:
        return f"{addr} is a link-local address (cloud metadata services live there)"
    if addr.is_multicast:
        return f"{addr} is a multicast address"
    if addr.is_unspecified:
        return f"{addr} is the unspecified address"
    if addr.is_private or any(addr in net for net in _NOT_PUBLIC) or not addr.is_global:
        return f"{addr} is a private or reserved address"
    return None


def _ends_in_number(host: str) -> bool:
    """WHATWG's test: a host whose last label is a number is an IPv4 address, in some spelling."""
    labels = host.split(".")
    if labels[-1] == "" and len(labels) > 1:
        labels.pop()
    return bool(_NUMBER.fullmatch(labels[-1]))


@dataclass(frozen=True)
class Destination:
    """A checked URL: connect to one of `addresses` (port `port`), sending `host` as Host and SNI."""

    scheme: str
    host: str
    port: int
    target: str  # path and query, as the request line carries them
    addresses: tuple[str, ...]


class AddressPolicy:
    def __init__(self, allow: Iterable[str] = (), resolve: Resolver = system_resolve):
        self.networks, self.hosts = parse_allow(allow)
        self.resolve = resolve

    def check(self, url: str) -> Destination:
        """Parse, resolve once and check; raises Refused (NotResolved when the name does not resolve)."""
        if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
            raise Refused("the URL contains spaces or control characters")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise Refused(f"scheme {parts.scheme or '(none)'!r} is not http or https")
        if "@" in parts.netloc:
            raise Refused("credentials in the URL (user:password@) are not allowed")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise Refused("the port is not a number between 1 and 65535") from None
        host = parts.hostname or ""
        if not host:
            raise Refused("the URL has no host")
        literal = _ip_literal(host, parts.netloc)
        if literal is not None:
            addresses = [literal]
        else:
            if not _HOST_NAME.fullmatch(host) or len(host) > 253:
                raise Refused(f"host {host!r} is not a valid host name")
            if _ends_in_number(host):
                raise Refused(f"host {host!r} is an IP address in an ambiguous spelling; write it as a.b.c.d")
            if host.rstrip(".") in self.hosts:  # an allowed name: whatever it resolves to
                return Destination(parts.scheme, host, port, _target(parts), tuple(self._resolve(host, port)))
            addresses = [_address(a, host) for a in self._resolve(host, port)]
        for addr in addresses:
            why = None if self._allowed(addr) else not_public(addr)
            if why:
                raise Refused(f"host {host!r} is not public: {why}")
        return Destination(parts.scheme, host, port, _target(parts), tuple(str(a) for a in addresses))

    def _resolve(self, host: str, port: int) -> list[str]:
        try:
            addresses = self.resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise NotResolved(f"host {host!r} does not resolve ({exc})") from None
        if not addresses:
            raise NotResolved(f"host {host!r} does not resolve")
        return addresses

    def _allowed(self, addr: IPAddress) -> bool:
        inner = _embedded_ipv4(addr)
        return any(addr in net or (inner is not None and inner in net) for net in self.networks)


def _address(text: str, host: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.split("%")[0])  # a link-local answer may carry a zone id
    except ValueError:
        raise Refused(f"host {host!r} resolved to {text!r}, which is not an IP address") from None


def _ip_literal(host: str, netloc: str) -> IPAddress | None:
    """The address of a canonical literal (`a.b.c.d`, `[v6]`), else None (a name). Zone ids refused."""
    if netloc.startswith("["):
        if "%" in host:
            raise Refused("IPv6 zone ids are not allowed")
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise Refused(f"host [{host}] is not an IPv6 address") from None
    try:
        return ipaddress.IPv4Address(host)
    except ValueError:
        return None


def _target(parts) -> str:
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def parse_allow(
    entries: Iterable[str],
) -> tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], frozenset[str]]:
    """(networks, host names) of allow-list entries: CIDRs or addresses (one-address networks), and
    exact host names. Raises ValueError naming a bad entry."""
    networks, hosts = [], set()
    for entry in entries:
        text = entry.strip().lower()
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
            continue
        except ValueError:
            pass
        if not _HOST_NAME.fullmatch(text) or _ends_in_number(text):
            raise ValueError(f"webhook allow-list entry {entry!r} is neither a CIDR nor a host name")
        hosts.add(text.rstrip("."))
    return tuple(networks), frozenset(hosts)


def redact(url: str) -> str:
    """The URL as logs may show it: scheme, host, port and path (no credentials, query or fragment,
    which may hold tokens)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "(unparsable URL)"
