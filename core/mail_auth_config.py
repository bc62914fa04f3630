"""The organization's mail authentication objects (docs/exchange.md, "Mail authentication").

Three objects, named and shaped as Exchange's cmdlets name them:

- ``[[dkim_signing_config]]`` (``New-/Set-/Get-/Rotate-DkimSigningConfig``): one per domain
  whose outbound mail is DKIM-signed. The keys are not here: they are server-local secret
  files (core/dkim_keys.py).
- ``[sender_id_config]`` (``Set-SenderIdConfig``): whether mail from the Internet is checked
  (SPF, DKIM, DMARC, ARC) and what a failed or undecided SPF check does.
- ``[[anti_phish_policy]]`` (``Set-AntiPhishPolicy``): the ``Default`` policy, which says
  whether a sender domain's DMARC policy is honoured and how.

They are read by the same loader as every other object, so the file, the store and the
cmdlets validate them by one set of rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hubport.core.addresses import AddressError, check_hostname, domain_to_ascii
from hubport.core.config_fields import FieldReader

__all__ = [
    "SELECTORS",
    "AntiPhishPolicy",
    "DkimSigningConfig",
    "SenderIdConfig",
    "read_anti_phish_policies",
    "read_dkim_signing_configs",
    "read_sender_id_config",
]

#: the two selectors a domain rotates between, as Exchange Online names them
SELECTORS = ("selector1", "selector2")
KEY_SIZES = (1024, 2048, 3072, 4096)
CANONICALIZATIONS = ("Relaxed", "Simple")
SPOOFED_DOMAIN_ACTIONS = ("StampStatus", "Reject", "Delete")
#: a DNS failure never deletes mail: the sender retries after a 451, or it is stamped
TEMP_ERROR_ACTIONS = ("StampStatus", "Reject")
DMARC_REJECT_ACTIONS = ("Reject", "Quarantine")
DMARC_QUARANTINE_ACTIONS = ("Quarantine", "Deliver")
DEFAULT_POLICY = "Default"


@dataclass(frozen=True)
class DkimSigningConfig:
    """DKIM signing of one domain's outbound mail (RFC 6376).

    ``active_selector`` signs; the other selector's key waits, already published, for the
    next ``Rotate-DkimSigningConfig`` (so a rotation never has a window in which receivers
    cannot find the key). ``ed25519`` adds a second, ed25519-sha256 signature (RFC 8463)
    under the selector ``<selector>-ed25519``.
    """

    name: str
    domain: str
    enabled: bool = False
    active_selector: str = SELECTORS[0]
    key_size: int = 2048
    ed25519: bool = False
    header_canonicalization: str = "Relaxed"
    body_canonicalization: str = "Relaxed"

    @property
    def inactive_selector(self) -> str:
        return SELECTORS[1] if self.active_selector == SELECTORS[0] else SELECTORS[0]

    @property
    def canonicalization(self) -> str:
        """The ``c=`` tag: ``relaxed/relaxed`` by default."""
        return f"{self.header_canonicalization}/{self.body_canonicalization}".lower()


@dataclass(frozen=True)
class SenderIdConfig:
    """Inbound checks of mail from the Internet (Exchange's Sender ID agent, extended to
    DKIM, DMARC and ARC). An organization without ``[sender_id_config]`` checks nothing, as
    an Exchange 2010 Hub Transport server without its anti-spam agents; the section, which
    the first Set-SenderIdConfig writes, turns the checks on unless it says
    ``Enabled = false``."""

    enabled: bool = False
    spoofed_domain_action: str = "StampStatus"
    temp_error_action: str = "StampStatus"
    bypassed_recipients: tuple[str, ...] = ()
    bypassed_sender_domains: tuple[str, ...] = ()
    #: the authserv-id of the Authentication-Results field ('' = the server's FQDN)
    authserv_id: str = ""
    #: ARC sealers whose chain may overrule a failed DMARC check (Exchange Online's
    #: Set-ArcConfig -ArcTrustedSealers)
    arc_trusted_sealers: tuple[str, ...] = ()

    def bypasses(self, sender_domain: str, recipients: Iterable[str]) -> bool:
        """Whether the actions are skipped for this message (it is still checked and stamped):
        its sender domain is bypassed, or every recipient is."""
        domain = sender_domain.lower()
        if any(domain == d or domain.endswith("." + d) for d in self.bypassed_sender_domains):
            return True
        wanted = [r.lower() for r in recipients]
        return bool(wanted) and all(r in self.bypassed_recipients for r in wanted)


@dataclass(frozen=True)
class AntiPhishPolicy:
    """What a failed DMARC check does when the sender domain asks for it (Exchange Online's
    anti-phishing policy; this version holds the one policy named ``Default``)."""

    name: str = DEFAULT_POLICY
    honor_dmarc_policy: bool = True
    dmarc_reject_action: str = "Reject"
    dmarc_quarantine_action: str = "Quarantine"
    #: where quarantined mail goes ('' = the organization's postmaster)
    quarantine_mailbox: str = ""


# -- readers (called by the organization loader) ------------------------------------------


def read_dkim_signing_configs(readers: Iterable[tuple[int, FieldReader]],
                              authoritative: Sequence[str]) -> tuple[DkimSigningConfig, ...]:
    """Every ``[[dkim_signing_config]]``: one per domain, each a domain the organization
    accepts mail for (``authoritative``: the accepted domains' names, wildcards as *.x)."""
    configs: list[DkimSigningConfig] = []
    seen: dict[str, str] = {}
    for index, r in readers:
        raw = r.string("DomainName", required=True) or ""
        name = r.string("Name") or raw
        domain = _domain(r, raw) if raw else None
        config = DkimSigningConfig(
            name=name,
            domain=domain or "",
            enabled=r.bool("Enabled", False),
            active_selector=r.string("ActiveSelector", SELECTORS[0], choices=SELECTORS),
            key_size=_key_size(r),
            ed25519=r.bool("Ed25519Enabled", False),
            header_canonicalization=r.string("HeaderCanonicalization", "Relaxed",
                                             choices=CANONICALIZATIONS),
            body_canonicalization=r.string("BodyCanonicalization", "Relaxed",
                                           choices=CANONICALIZATIONS),
        )
        r.finish()
        if domain is None:
            continue
        if name.lower() != domain:
            r.error("Name", f'"{name}": a DKIM signing configuration is named by its domain'
                            f' ({domain})')
        if not _accepted(domain, authoritative):
            r.error("DomainName", f"{domain} is not an accepted domain of the organization"
                                  " (New-AcceptedDomain first: only the organization's own"
                                  " domains are signed)")
        if domain in seen:
            r.error("DomainName", f"{domain} already has a signing configuration"
                                  f" ({seen[domain]})")
            continue
        seen[domain] = f"entry {index + 1}"
        configs.append(config)
    return tuple(configs)


def read_sender_id_config(reader: FieldReader | None) -> SenderIdConfig:
    if reader is None:
        return SenderIdConfig()
    r = reader
    temp = r.string("TempErrorAction", "StampStatus",
                    choices=(*TEMP_ERROR_ACTIONS, "Delete"))
    if temp == "Delete":
        r.error("TempErrorAction", "Delete would lose legitimate mail whenever DNS fails;"
                                   " use Reject (451: the sender tries again) or StampStatus")
        temp = "StampStatus"
    recipients = []
    for address in r.string_list("BypassedRecipients"):
        try:
            recipients.append(_normalized_address(address))
        except AddressError as exc:
            r.error("BypassedRecipients", f'"{address}": {exc}')
    config = SenderIdConfig(
        enabled=r.bool("Enabled", True),
        spoofed_domain_action=r.string("SpoofedDomainAction", "StampStatus",
                                       choices=SPOOFED_DOMAIN_ACTIONS),
        temp_error_action=temp,
        bypassed_recipients=tuple(recipients),
        bypassed_sender_domains=_domains(r, "BypassedSenderDomains"),
        authserv_id=_authserv_id(r),
        arc_trusted_sealers=_domains(r, "ArcTrustedSealers"),
    )
    r.finish()
    return config


def read_anti_phish_policies(readers: Iterable[tuple[int, FieldReader]]
                             ) -> tuple[AntiPhishPolicy, ...]:
    """The ``Default`` policy (made with its defaults when the file has none)."""
    policies: list[AntiPhishPolicy] = []
    for _index, r in readers:
        name = r.name()
        policy = AntiPhishPolicy(
            name=name,
            honor_dmarc_policy=r.bool("HonorDmarcPolicy", True),
            dmarc_reject_action=r.string("DmarcRejectAction", "Reject",
                                         choices=DMARC_REJECT_ACTIONS),
            dmarc_quarantine_action=r.string("DmarcQuarantineAction", "Quarantine",
                                             choices=DMARC_QUARANTINE_ACTIONS),
            quarantine_mailbox=_optional_address(r, "QuarantineMailbox"),
        )
        r.finish()
        if name and name.lower() != DEFAULT_POLICY.lower():
            r.error("Name", f'"{name}": this version has one anti-phishing policy, named'
                            f" {DEFAULT_POLICY} (Set-AntiPhishPolicy -Identity Default)")
            continue
        if policies:
            r.error("Name", "the Default policy is already declared")
            continue
        policies.append(policy)
    return tuple(policies) or (AntiPhishPolicy(),)


def _optional_address(r: FieldReader, key: str) -> str:
    """An SMTP address, or '' (written or left out) for the default."""
    if r.raw(key, "") == "":
        return ""
    return r.smtp_address(key, default="") or ""


def _key_size(r: FieldReader) -> int:
    r.offer("KeySize", [str(size) for size in KEY_SIZES])
    size = r.int("KeySize", 2048)
    if size not in KEY_SIZES:
        r.error("KeySize", f"{size} is not one of {', '.join(map(str, KEY_SIZES))} (RFC 8301:"
                           " at least 1024 bits; 2048 is what receivers expect)")
        return 2048
    return size


def _domain(r: FieldReader, raw: str) -> str | None:
    try:
        return check_hostname(domain_to_ascii(raw.strip().rstrip(".")))
    except AddressError as exc:
        r.error("DomainName", f'"{raw}": {exc}')
        return None


def _domains(r: FieldReader, key: str) -> tuple[str, ...]:
    out = []
    for raw in r.string_list(key):
        try:
            out.append(check_hostname(domain_to_ascii(raw.strip().rstrip("."))))
        except AddressError as exc:
            r.error(key, f'"{raw}": {exc}')
    return tuple(out)


def _authserv_id(r: FieldReader) -> str:
    raw = r.string("AuthservId", "") or ""
    if not raw:
        return ""
    try:
        return check_hostname(domain_to_ascii(raw.strip().rstrip(".")))
    except AddressError as exc:
        r.error("AuthservId", f'"{raw}": {exc} (RFC 8601: the authserv-id names the host'
                              " or domain that checked the message)")
        return ""


def _normalized_address(address: str) -> str:
    from hubport.core.addresses import normalize_address

    return normalize_address(address).lower()


def _accepted(domain: str, accepted: Sequence[str]) -> bool:
    for name in accepted:
        if name.startswith("*."):
            base = name[2:]
            if domain == base or domain.endswith("." + base):
                return True
        elif domain == name:
            return True
    return False
