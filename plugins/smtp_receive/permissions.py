"""Permission groups, the principals a session can be, and the rights they grant
(docs/exchange.md, "Receive connectors and permission groups").

A receive connector lists ``PermissionGroups``; a session is one principal (anonymous, an
authenticated mailbox user, an Exchange server proven by certificate, an externally secured
server, a partner). The session's rights are those its principal receives from the groups
the connector lists, plus any ``Permissions`` entries (Add-ADPermission) naming it.
"""

from __future__ import annotations

import enum

__all__ = [
    "GROUPS",
    "Principal",
    "Right",
    "parse_right",
    "rights_for",
]


class Right(str, enum.Enum):
    SUBMIT = "ms-Exch-SMTP-Submit"
    ACCEPT_ANY_RECIPIENT = "ms-Exch-SMTP-Accept-Any-Recipient"
    ACCEPT_ANY_SENDER = "ms-Exch-SMTP-Accept-Any-Sender"
    ACCEPT_AUTHORITATIVE_DOMAIN_SENDER = "ms-Exch-SMTP-Accept-Authoritative-Domain-Sender"
    ACCEPT_AUTHENTICATION_FLAG = "ms-Exch-SMTP-Accept-Authentication-Flag"
    ACCEPT_EXCH50 = "ms-Exch-SMTP-Accept-Exch50"
    BYPASS_ANTI_SPAM = "ms-Exch-Bypass-Anti-Spam"
    BYPASS_MESSAGE_SIZE_LIMIT = "ms-Exch-Bypass-Message-Size-Limit"
    ACCEPT_HEADERS_ROUTING = "ms-Exch-Accept-Headers-Routing"
    ACCEPT_HEADERS_ORGANIZATION = "ms-Exch-Accept-Headers-Organization"
    ACCEPT_HEADERS_FOREST = "ms-Exch-Accept-Headers-Forest"


class Principal(str, enum.Enum):
    """Who a session is, as Exchange names the security principal."""

    ANONYMOUS = "NT AUTHORITY\\ANONYMOUS LOGON"
    AUTHENTICATED_USER = "NT AUTHORITY\\Authenticated Users"
    EXCHANGE_SERVER = "MS Exchange\\Hub Transport Servers"
    EXTERNALLY_SECURED = "MS Exchange\\Externally Secured Servers"
    LEGACY_SERVER = "MS Exchange\\ExchangeLegacyInterop"
    PARTNER = "MS Exchange\\Partner Servers"


R = Right
_SERVER_RIGHTS = frozenset({
    R.ACCEPT_HEADERS_FOREST, R.ACCEPT_HEADERS_ORGANIZATION, R.ACCEPT_HEADERS_ROUTING,
    R.BYPASS_ANTI_SPAM, R.BYPASS_MESSAGE_SIZE_LIMIT, R.ACCEPT_ANY_RECIPIENT,
    R.ACCEPT_ANY_SENDER, R.ACCEPT_AUTHENTICATION_FLAG, R.ACCEPT_AUTHORITATIVE_DOMAIN_SENDER,
    R.ACCEPT_EXCH50, R.SUBMIT,
})
_WITHOUT_ORG_HEADERS = _SERVER_RIGHTS - {R.ACCEPT_HEADERS_FOREST, R.ACCEPT_HEADERS_ORGANIZATION}

#: PermissionGroups value -> {principal: rights}, the table of
#: (docs/exchange.md, "Receive connectors and permission groups")
GROUPS: dict[str, dict[Principal, frozenset[Right]]] = {
    "None": {},
    "AnonymousUsers": {Principal.ANONYMOUS: frozenset({
        R.ACCEPT_HEADERS_ROUTING, R.ACCEPT_ANY_SENDER, R.ACCEPT_AUTHORITATIVE_DOMAIN_SENDER,
        R.SUBMIT})},
    "ExchangeUsers": {Principal.AUTHENTICATED_USER: frozenset({
        R.ACCEPT_HEADERS_ROUTING, R.BYPASS_ANTI_SPAM, R.ACCEPT_ANY_RECIPIENT, R.SUBMIT})},
    "ExchangeServers": {Principal.EXCHANGE_SERVER: _SERVER_RIGHTS,
                        Principal.EXTERNALLY_SECURED: _WITHOUT_ORG_HEADERS},
    "ExchangeLegacyServers": {Principal.LEGACY_SERVER: _WITHOUT_ORG_HEADERS},
    "Partners": {Principal.PARTNER: frozenset({R.ACCEPT_HEADERS_ROUTING, R.SUBMIT})},
    "Custom": {},  # rights come from the connector's Permissions entries only
}

_RIGHT_NAMES = {r.value.lower(): r for r in Right}
_RIGHT_NAMES.update({r.value.lower().removeprefix("ms-exch-"): r for r in Right})
_RIGHT_NAMES.update({r.value.lower().removeprefix("ms-exch-smtp-"): r for r in Right})


def parse_right(text: str) -> Right:
    """`ms-Exch-SMTP-Accept-Any-Recipient`, or without its `ms-Exch-` prefix; ValueError."""
    right = _RIGHT_NAMES.get(text.strip().lower())
    if right is None:
        from hubport.core.config_fields import suggest

        raise ValueError(f"{text!r} is not a transport extended right"
                         f"{suggest(text.strip(), [r.value for r in Right])}")
    return right


def parse_principal(text: str) -> Principal:
    """`NT AUTHORITY\\ANONYMOUS LOGON` and the other principals (case-insensitive)."""
    wanted = text.strip().lower()
    for principal in Principal:
        if principal.value.lower() == wanted or principal.name.lower() == wanted:
            return principal
    raise ValueError(f"{text!r} is not a principal a receive connector knows"
                     f" ({', '.join(p.value for p in Principal)})")


def rights_for(principal: Principal, groups: frozenset[str],
               extra: dict[Principal, frozenset[Right]] | None = None) -> frozenset[Right]:
    """The rights ``principal`` holds on a connector with these groups and permissions."""
    rights: set[Right] = set()
    for group in groups:
        rights |= GROUPS.get(group, {}).get(principal, frozenset())
    if extra:
        rights |= extra.get(principal, frozenset())
    return frozenset(rights)
