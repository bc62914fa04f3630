"""The recipient directory: what Exchange asks Active Directory during categorization.

Built once per organization config: every proxy address (primary and secondary SMTP
addresses, non-SMTP addresses such as ``FAX:+15551234``) maps to the one recipient object
that owns it. Lookups are case-insensitive, as in Exchange. postmaster@ an Authoritative
domain that nobody holds resolves to the organization's postmaster recipient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from hubport.core.addresses import imcea_decode, imcea_encode, parse_proxy_address

if TYPE_CHECKING:
    from hubport.core.config import DistributionGroup, Mailbox, MailContact, Organization

RecipientObject = Union["Mailbox", "MailContact", "DistributionGroup"]


@dataclass(frozen=True, slots=True)
class DirectoryEntry:
    kind: str  # "mailbox", "contact" or "group"
    obj: RecipientObject
    primary: str  # the primary SMTP address

    @property
    def name(self) -> str:
        return self.obj.name


@dataclass(frozen=True, slots=True)
class ForeignAddress:
    """A non-SMTP address (FAX, X400 ...) and its IMCEA form in the default domain."""

    type: str
    address: str
    imcea: str


class RecipientDirectory:
    def __init__(self, org: Organization) -> None:
        self.org = org
        self.default_domain = org.default_domain.domain_name
        self._by_address: dict[str, DirectoryEntry] = {}
        self._by_name: dict[str, DirectoryEntry] = {}
        for kind, objects in (("mailbox", org.mailboxes), ("contact", org.mail_contacts),
                              ("group", org.distribution_groups)):
            for obj in objects:
                entry = DirectoryEntry(kind, obj, obj.primary_smtp_address)
                self._by_name[obj.name.lower()] = entry
                self._by_address[obj.primary_smtp_address.lower()] = entry
                for proxy in obj.email_addresses:
                    ptype, value, _ = parse_proxy_address(proxy)
                    self._by_address[_key(ptype, value)] = entry

    def lookup(self, address: str) -> DirectoryEntry | None:
        """The recipient object owning an SMTP address (or an IMCEA-encapsulated one)."""
        entry = self._by_address.get(address.lower())
        if entry is not None:
            return entry
        foreign = self.foreign(address)
        if foreign is not None:
            return self._by_address.get(_key(foreign.type, foreign.address))
        postmaster = self.org.postmaster_fallback(address)  # RFC 5321 §4.5.1
        return self._by_name.get(postmaster.name.lower()) if postmaster is not None else None

    def member(self, reference: str) -> DirectoryEntry | None:
        """A group member given by name or by address."""
        return self._by_name.get(reference.lower()) or self.lookup(reference)

    def mailbox(self, address: str) -> Mailbox | None:
        entry = self.lookup(address)
        return entry.obj if entry is not None and entry.kind == "mailbox" else None  # type: ignore[return-value]

    def foreign(self, address: str) -> ForeignAddress | None:
        """Unwrap an IMCEA address; only those in the default accepted domain count."""
        if not address.lower().endswith("@" + self.default_domain.lower()):
            return None
        decoded = imcea_decode(address)
        if decoded is None:
            return None
        return ForeignAddress(decoded[0], decoded[1], address)

    def encapsulate(self, addr_type: str, address: str) -> str:
        return imcea_encode(addr_type, address, self.default_domain)


def _key(ptype: str, value: str) -> str:
    return value.lower() if ptype == "SMTP" else f"{ptype}:{value}".lower()

