"""DNS for the checks: one cached resolver per set of servers, used from the checks' threads.

The checks (pyspf, dkimpy, DMARC) are synchronous code run in worker threads, so they look
names up with dnspython's synchronous resolver there, never on the event loop. Answers are
cached with their TTLs (``dns.resolver.LRUCache``, shared by the threads) so that the mail of
one busy sender domain costs one lookup per TTL, not per message. The servers are the
transport server's ``ExternalDnsServers`` when it names any, else the system's.

Every failure that is not an answer (timeout, SERVFAIL, no server) is ``TemporaryDnsError``:
a check that meets it reports ``temperror``, never a permanent result.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from hubport.core.dns_resolver import resolver_for

__all__ = ["Lookup", "TemporaryDnsError", "lookup_for"]

TIMEOUT = 3.0  # per query to one server
LIFETIME = 8.0  # a whole lookup
CACHE_SIZE = 50_000


class TemporaryDnsError(Exception):
    """The DNS could not answer now (RFC 7208 §2.6.6, RFC 7489 §6.6.3: temperror)."""


class Lookup:
    """TXT, A, AAAA, MX and PTR lookups through one resolver and its cache."""

    def __init__(self, servers: Sequence[tuple[str, int]]) -> None:
        resolver = resolver_for(dns.resolver.Resolver, servers, timeout=TIMEOUT,
                                lifetime=LIFETIME)
        resolver.cache = dns.resolver.LRUCache(CACHE_SIZE)
        self.resolver = resolver

    def query(self, name: str, rdtype: str) -> list[Any]:
        """The records (empty for NXDOMAIN or no data); TemporaryDnsError otherwise."""
        try:
            answer = self.resolver.resolve(name, rdtype, search=False,
                                           raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return []
        except (dns.resolver.NoNameservers, dns.exception.Timeout,
                dns.resolver.NoResolverConfiguration, dns.resolver.YXDOMAIN, OSError) as exc:
            raise TemporaryDnsError(f"{rdtype} {name}: {type(exc).__name__}") from exc
        except (dns.name.LabelTooLong, dns.name.NameTooLong, dns.name.EmptyLabel,
                UnicodeError):
            return []  # not a name that can exist
        except dns.exception.DNSException as exc:
            raise TemporaryDnsError(f"{rdtype} {name}: {type(exc).__name__}") from exc
        return list(answer) if answer.rrset is not None else []

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record's strings joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
        return [b"".join(r.strings) for r in self.query(name, "TXT")]

    # -- the shapes the libraries want ------------------------------------------------

    def dkim_txt(self, name: bytes, timeout: float = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the first TXT record of a key name, or None."""
        import dkim

        try:
            records = self.txt(name.decode("ascii", "replace").rstrip("."))
        except TemporaryDnsError as exc:
            raise dkim.DnsTimeoutError(str(exc)) from None
        return records[0] if records else None

    def spf_lookup(self, name: str, qtype: str, strict: bool = True,
                   timeout: float = 20) -> list[tuple[tuple[str, str], Any]]:
        """pyspf's ``DNSLookup``: ((name, type), value) pairs as its dnspython lookup gives."""
        import spf

        try:
            records = self.query(name, qtype)
        except TemporaryDnsError as exc:
            raise spf.TempError(f"DNS {exc}") from None
        out: list[tuple[tuple[str, str], Any]] = []
        for r in records:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), r.address))
            elif qtype == "MX":
                out.append(((name, qtype), (r.preference, r.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), r.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), r.strings))
        return out


_lookups: dict[tuple[tuple[str, int], ...], Lookup] = {}
_lock = threading.Lock()


def lookup_for(servers: Sequence[tuple[str, int]]) -> Lookup:
    """The one Lookup (and cache) for these servers."""
    key = tuple(servers)
    with _lock:
        found = _lookups.get(key)
        if found is None:
            found = _lookups[key] = Lookup(key)
        return found
