"""The decisions of a receive connector that need no socket: relay, sender, hops, trace.

Kept apart from the protocol code so each rule can be read and tested on its own.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from hubport.core.addresses import AddressError, check_hostname, domain_of, domain_to_ascii
from hubport.core.headers import HeaderField, ParsedMessage, make_received
from hubport.core.model import SmtpResponse
from hubport.plugins.smtp_receive.permissions import Right

if TYPE_CHECKING:
    from hubport.core.config import Organization

UNABLE_TO_RELAY = SmtpResponse(550, "5.7.1", "Unable to relay")
USER_UNKNOWN = SmtpResponse(550, "5.1.1", "User unknown")
SEND_AS_DENIED = SmtpResponse(550, "5.7.1", "Client does not have permissions to send as this"
                                            " sender")
HOP_COUNT = SmtpResponse(554, "5.4.6", "Hop count exceeded - possible mail loop")

_ROUTING_HEADERS = ("received", "resent-")
_ORG_PREFIX = "x-ms-exchange-organization-"
_FOREST_PREFIX = "x-ms-exchange-forest-"
_HELO_SAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


def check_recipient(org: Organization, address: str,
                    rights: frozenset[Right]) -> SmtpResponse | None:
    """None when RCPT may be accepted; else the refusal (Exchange permission groups).

    The domain is whatever follows the last unquoted ``@`` of the normalized address, so
    the percent hack, bang paths and quoted local parts stay local parts of our domain.
    """
    accepted = org.accepted_domain_for(domain_of(address))
    if accepted is None:
        return None if Right.ACCEPT_ANY_RECIPIENT in rights else UNABLE_TO_RELAY
    if accepted.domain_type == "Authoritative" and org.recipient_for_address(address) is None:
        return USER_UNKNOWN
    return None


def check_sender(org: Organization, address: str, rights: frozenset[Right],
                 own_addresses: tuple[str, ...] | None) -> SmtpResponse | None:
    """The anti-spoofing rules of MAIL FROM.

    An authenticated user may send as one of its own addresses (any address with
    Accept-Any-Sender). Otherwise a sender in an authoritative domain needs
    Accept-Authoritative-Domain-Sender (or Accept-Any-Sender). The null sender always passes.
    """
    if not address or Right.ACCEPT_ANY_SENDER in rights:
        return None
    if own_addresses is not None:
        wanted = address.lower()
        return None if any(a.lower() == wanted for a in own_addresses) else SEND_AS_DENIED
    accepted = org.accepted_domain_for(domain_of(address))
    if accepted is not None and accepted.domain_type == "Authoritative" and \
            Right.ACCEPT_AUTHORITATIVE_DOMAIN_SENDER not in rights:
        return SEND_AS_DENIED
    return None


def check_hops(parsed: ParsedMessage, *, max_hops: int, max_local_hops: int,
               local_names: frozenset[str]) -> SmtpResponse | None:
    """MaxHopCount counts Received fields; MaxLocalHopCount those added by our servers."""
    received = parsed.get_all("received")
    if len(received) > max_hops:
        return HOP_COUNT
    if max_local_hops and local_names:
        local = sum(1 for f in received if _by_host(f) in local_names)
        if local > max_local_hops:
            return HOP_COUNT
    return None


def _by_host(field: HeaderField) -> str:
    """The host after ``by`` in a Received field, lower-cased ('' if none)."""
    match = re.search(rb"\bby\s+([^\s;()]+)", field.value_bytes, re.IGNORECASE)
    return match.group(1).decode("ascii", "replace").lower().rstrip(".") if match else ""


def firewalled(rights: frozenset[Right]) -> Callable[[HeaderField], bool] | None:
    """The header firewall: which incoming fields this session may not bring in."""
    routing = Right.ACCEPT_HEADERS_ROUTING in rights
    organization = Right.ACCEPT_HEADERS_ORGANIZATION in rights
    forest = Right.ACCEPT_HEADERS_FOREST in rights
    if routing and organization and forest:
        return None

    def remove(field: HeaderField) -> bool:
        name = field.lname
        if not routing and name.startswith(_ROUTING_HEADERS):
            return True
        if not organization and name.startswith(_ORG_PREFIX):
            return True
        return not forest and name.startswith(_FOREST_PREFIX)

    return remove


@functools.lru_cache(maxsize=1024)
def helo_for_header(helo: str) -> str:
    """A HELO argument as it may stand in a Received field (never anything but a token)."""
    if helo.startswith("[") and helo.endswith("]"):
        return _HELO_SAFE.sub("?", helo)
    try:
        return check_hostname(domain_to_ascii(helo.rstrip(".")))
    except AddressError:
        return _HELO_SAFE.sub("?", helo)[:255] or "unknown"


def received_field(*, helo: str, remote_ip: str, fqdn: str, local_ip: str, esmtp: bool,
                   tls: str | None, user: str | None, session_id: str,
                   recipient: str | None, when: float) -> bytes:
    """Our trace field (RFC 5321 §4.4; protocol names of RFC 3848)."""
    protocol = "ESMTP" if esmtp else "SMTP"
    if tls:
        protocol += "S"
    if user:
        protocol += "A"
    comments = [c for c in (tls, f"authenticated as {user}" if user else None) if c]
    with_ = protocol + (f" ({'; '.join(comments)})" if comments else "")
    return make_received(
        from_=f"{helo_for_header(helo) or 'unknown'} ([{remote_ip}])",
        by=f"{fqdn} ([{local_ip}])",
        with_=with_,
        id_=session_id,
        for_=recipient,
        when=when,
    )
