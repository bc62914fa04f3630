"""RemoteIPRanges: single addresses, `a-b` ranges and CIDR blocks, and how specific they are.

Exchange picks, among the connectors on the binding a client reached, the one whose remote
range contains the client most specifically; two connectors may share a binding only when
their ranges are disjoint or one contains the other
(docs/exchange.md, "Receive connectors and permission groups").
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = ["IPRange", "parse_range"]


@dataclass(frozen=True, slots=True)
class IPRange:
    """An inclusive range of addresses of one family, kept as integers."""

    version: int
    first: int
    last: int
    text: str

    @property
    def size(self) -> int:
        """The number of addresses: fewer is more specific."""
        return self.last - self.first + 1

    def contains(self, address: IPAddress) -> bool:
        return address.version == self.version and self.first <= int(address) <= self.last

    def covers(self, other: IPRange) -> bool:
        return (self.version == other.version and self.first <= other.first
                and other.last <= self.last)

    def overlaps(self, other: IPRange) -> bool:
        return (self.version == other.version and self.first <= other.last
                and other.first <= self.last)

    def nests_with(self, other: IPRange) -> bool:
        """Disjoint, or one inside the other: the only arrangements Exchange allows."""
        return not self.overlaps(other) or self.covers(other) or other.covers(self)

    def __str__(self) -> str:
        return self.text


def parse_range(text: str) -> IPRange:
    """`192.0.2.7`, `192.0.2.10-192.0.2.20`, `192.0.2.0/24`, `2001:db8::/32`; ValueError."""
    raw = text.strip()
    if "/" in raw:
        try:
            net = ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise ValueError(f"{raw!r} is not a CIDR block") from None
        return IPRange(net.version, int(net.network_address), int(net.broadcast_address),
                       net.compressed)
    if "-" in raw:
        low_text, _, high_text = raw.partition("-")
        low, high = _address(low_text), _address(high_text)
        if low.version != high.version:
            raise ValueError(f"{raw!r} mixes IPv4 and IPv6")
        if int(low) > int(high):
            raise ValueError(f"{raw!r} starts after it ends")
        return IPRange(low.version, int(low), int(high), f"{low.compressed}-{high.compressed}")
    address = _address(raw)
    return IPRange(address.version, int(address), int(address), address.compressed)


def _address(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not an IP address") from None
