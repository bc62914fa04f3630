"""The DNS resolver a transport server asks: its ``ExternalDnsServers`` when it names any,
else the system's (``Set-TransportServer -ExternalDnsServers``). One construction for every
plugin that looks names up: MX routing (async) and the mail authentication checks (sync,
in their threads)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import dns.nameserver
import dns.resolver

__all__ = ["resolver_for"]

ResolverType = TypeVar("ResolverType", bound=dns.resolver.BaseResolver)


def resolver_for(kind: type[ResolverType], servers: Sequence[tuple[str, int]], *,
                 timeout: float, lifetime: float) -> ResolverType:
    """A resolver of ``kind`` (``dns.resolver.Resolver`` or ``dns.asyncresolver.Resolver``)
    asking ``servers`` ((ip, port) pairs), or the system's servers for none; a machine
    without a resolver configuration gets an empty one, whose lookups fail as temporary."""
    if servers:
        resolver = kind(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers]
    else:
        try:
            resolver = kind()
        except dns.resolver.NoResolverConfiguration:
            resolver = kind(configure=False)
    resolver.timeout = timeout
    resolver.lifetime = lifetime
    return resolver
