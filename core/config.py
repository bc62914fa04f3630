"""The organization: what Exchange keeps in Active Directory, read from one TOML file.

`load_organization` turns the file (or the embedded `core/default.toml`) into frozen
dataclasses. Validation collects every problem (file, object, field, reason) and raises one
`ConfigErrors`, so a bad edit is refused as a whole and the running organization is kept.
Connector sections are read by the connector types the plugins registered; this module
knows only the objects every Exchange organization has.
"""

from __future__ import annotations

import heapq
import itertools
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from hubport.core.addresses import (
    AddressError,
    check_hostname,
    domain_to_ascii,
    normalize_address,
    parse_proxy_address,
)
from hubport.core.backpressure import Thresholds
from hubport.core.config_fields import (
    EMBEDDED_SOURCE,
    ConfigContext,
    ConfigError,
    ConfigErrors,
    FieldReader,
    suggest,
)
from hubport.core.connectors import Connector, ConnectorType
from hubport.core.mail_auth_config import (
    AntiPhishPolicy,
    DkimSigningConfig,
    SenderIdConfig,
    read_anti_phish_policies,
    read_dkim_signing_configs,
    read_sender_id_config,
)
from hubport.core.routing_groups import (
    LegacyServer,
    RoutingGroup,
    legacy_senders,
    read_routing_groups,
)

__all__ = [
    "DEFAULT_DSN_COPY_CODES",
    "DOMAIN_TYPES",
    "IMPLICIT_SERVER",
    "IMPLICIT_SITE",
    "SECTIONS",
    "AcceptedDomain",
    "DistributionGroup",
    "MailContact",
    "Mailbox",
    "Organization",
    "Recipient",
    "Site",
    "SiteLink",
    "TransportConfig",
    "TransportServer",
    "load_organization",
    "parse_organization",
]

#: the embedded default organization (package data of `core`)
DEFAULT_RESOURCE = "default.toml"
IMPLICIT_SITE = "Default-First-Site-Name"
IMPLICIT_SERVER = "HUB01"
DOMAIN_TYPES = ("Authoritative", "InternalRelay", "ExternalRelay")
#: Set-TransportConfig -GenerateCopyOfDSNFor defaults (docs/exchange.md, "Expiry, DSNs and Poison")
DEFAULT_DSN_COPY_CODES = ("5.4.8", "5.4.6", "5.4.4", "5.2.4", "5.2.0", "5.1.4")
#: the sections this module reads itself (connector sections come from the plugins)
SECTIONS = (
    "hubport",
    "transport_config",
    "site",
    "site_link",
    "accepted_domain",
    "transport_server",
    "routing_group",
    "mailbox",
    "mail_contact",
    "distribution_group",
    "dkim_signing_config",
    "sender_id_config",
    "anti_phish_policy",
)

KB = 1024
MB = 1024 * KB
GB = 1024 * MB
MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0

_ALIAS_CHARS = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]+")
_DSN_CODE = re.compile(r"[45]\.\d{1,3}\.\d{1,3}")


# ---------------------------------------------------------------------------------------------
# the objects


@dataclass(frozen=True)
class AcceptedDomain:
    """New-AcceptedDomain: a domain this organization receives mail for."""

    name: str
    domain_name: str  # lower-case ASCII; `*.contoso.test` covers the domain and its subdomains
    domain_type: str = "Authoritative"
    default: bool = False
    address_book_enabled: bool = True

    @property
    def is_wildcard(self) -> bool:
        return self.domain_name.startswith("*.")

    @property
    def base_domain(self) -> str:
        """The domain without its `*.` wildcard."""
        return self.domain_name[2:] if self.is_wildcard else self.domain_name

    def matches(self, domain: str) -> int | None:
        """Specificity of the match (higher wins; exact beats wildcard), or None."""
        try:
            wanted = domain_to_ascii(domain.strip().rstrip("."))
        except AddressError:
            return None
        base = self.base_domain
        if not self.is_wildcard:
            return 2 * len(base) + 1 if wanted == base else None
        if wanted == base or wanted.endswith("." + base):
            return 2 * len(base)
        return None


class _RecipientMixin:
    """What every recipient object offers the categorizer."""

    section: ClassVar[str] = ""
    name: str
    primary_smtp_address: str
    email_addresses: tuple[str, ...]

    @property
    def smtp_addresses(self) -> tuple[str, ...]:
        """Every SMTP proxy address, primary first."""
        return tuple(p[5:] for p in self.email_addresses if p[:5].lower() == "smtp:")

    def describe(self) -> str:
        return f'{self.section} "{self.name}"'


@dataclass(frozen=True)
class Mailbox(_RecipientMixin):
    """New-Mailbox: a recipient whose mail is delivered on a transport server of ours."""

    section: ClassVar[str] = "mailbox"

    name: str
    alias: str
    primary_smtp_address: str
    email_addresses: tuple[str, ...] = ()  # proxy form, `SMTP:<primary>` first
    server: str | None = None  # the transport server whose mailbox database holds it
    #: a legacy routing group that homes it instead (its mail leaves through a Routing
    #: Group connector)
    routing_group: str | None = None
    max_receive_size: int | None = None  # None: unlimited (the organization limit applies)
    password_hash: str | None = None


@dataclass(frozen=True)
class MailContact(_RecipientMixin):
    """New-MailContact: a directory entry whose mail goes to an external address."""

    section: ClassVar[str] = "mail_contact"

    name: str
    alias: str
    external_email_address: str  # proxy form: `SMTP:x@example.net` or `FAX:+15551234`
    primary_smtp_address: str
    email_addresses: tuple[str, ...] = ()
    #: a legacy routing group that homes it (its mail goes there, not to its address)
    routing_group: str | None = None

    @property
    def external_type(self) -> str:
        """`SMTP`, `FAX`, `X400` ...: the address type routing looks at."""
        return self.external_email_address.partition(":")[0]

    @property
    def external_address(self) -> str:
        return self.external_email_address.partition(":")[2]


@dataclass(frozen=True)
class DistributionGroup(_RecipientMixin):
    """New-DistributionGroup: expanded by the categorizer into its members."""

    section: ClassVar[str] = "distribution_group"

    name: str
    alias: str
    primary_smtp_address: str
    email_addresses: tuple[str, ...] = ()
    members: tuple[str, ...] = ()  # primary SMTP addresses of the member recipients


Recipient = Mailbox | MailContact | DistributionGroup


@dataclass(frozen=True)
class Site:
    """An AD site (Set-AdSite)."""

    name: str
    hub_site_enabled: bool = False
    inbound_mail_enabled: bool = True


@dataclass(frozen=True)
class SiteLink:
    """An AD IP site link (Set-AdSiteLink); `cost` is ExchangeCost when set, else the AD cost."""

    name: str
    sites: tuple[str, ...]
    cost: int = 100
    max_message_size: int | None = None  # None: unlimited


#: the management endpoint's port when a ManagementBindings entry names none
MANAGEMENT_PORT = 5480

#: back pressure defaults: 0 derives a disk threshold from the volume; Exchange 2010's
#: 71/73/75 % of physical memory for its process
DERIVED_DISK_THRESHOLDS = Thresholds(0, 0, 0)
PRIVATE_BYTES_THRESHOLDS = Thresholds(71, 73, 75)
SUBMISSION_QUEUE_THRESHOLDS = Thresholds(2000, 10000, 15000)


@dataclass(frozen=True)
class TransportServer:
    """Set-TransportServer: one hub; durations are seconds, sizes bytes, None = off/unlimited."""

    name: str
    site: str = IMPLICIT_SITE
    fqdn: str = ""
    state_directory: Path = Path("var")
    pickup_directory_path: Path | None = Path("pickup")
    replay_directory_path: Path | None = Path("replay")
    root_drop_directory_path: Path | None = Path("drop")
    pickup_directory_max_header_size: int = 64 * KB
    pickup_directory_max_recipients_per_message: int = 100
    pickup_directory_max_messages_per_minute: int | None = 100  # None: no throttle
    folder_rescan_interval: float = 5.0
    folder_settle_time: float = 1.0
    message_expiration_timeout: float = 2 * DAY
    delay_notification_timeout: float = 4 * HOUR
    queue_glitch_retry_count: int = 4
    queue_glitch_retry_interval: float = MINUTE
    transient_failure_retry_count: int = 6
    transient_failure_retry_interval: float = 5 * MINUTE
    outbound_connection_failure_retry_interval: float = 10 * MINUTE
    message_retry_interval: float = MINUTE
    queue_max_idle_time: float = 3 * MINUTE
    poison_threshold: int = 2
    poison_message_detection_enabled: bool = True
    message_tracking_log_enabled: bool = True
    message_tracking_log_path: Path = Path("var/logs/MessageTracking")
    message_tracking_log_max_age: float | None = 30 * DAY  # None: never expire
    message_tracking_log_max_directory_size: int | None = GB
    message_tracking_log_max_file_size: int = 10 * MB
    message_tracking_log_subject_logging_enabled: bool = True
    external_dns_servers: tuple[tuple[str, int], ...] = ()  # (ip, port); () = system resolver
    max_outbound_connections: int | None = 1000
    max_per_domain_outbound_connections: int | None = 20
    #: back pressure (core/backpressure.py): thresholds are (Normal, Medium, High); for the
    #: disks 0 = derived from the volume's size and the minimum free space (Exchange's rule)
    enable_resource_monitoring: bool = True
    resource_monitoring_interval: float = 1.0
    queue_database_minimum_free_space: int = 100 * MB
    percentage_database_disk_space_used: Thresholds = DERIVED_DISK_THRESHOLDS
    log_disk_minimum_free_space: int = 100 * MB
    percentage_log_disk_space_used: Thresholds = DERIVED_DISK_THRESHOLDS
    percentage_private_bytes_used: Thresholds = PRIVATE_BYTES_THRESHOLDS
    submission_queue_length: Thresholds = SUBMISSION_QUEUE_THRESHOLDS
    #: protocol logs (docs/exchange.md, "Message tracking and protocol logs"); None = off.
    #: The limits apply to each of the two folders.
    receive_protocol_log_path: Path | None = Path("var/logs/ProtocolLog/SmtpReceive")
    send_protocol_log_path: Path | None = Path("var/logs/ProtocolLog/SmtpSend")
    protocol_log_max_age: float | None = 30 * DAY
    protocol_log_max_directory_size: int | None = 250 * MB
    protocol_log_max_file_size: int = 10 * MB
    #: the Send protocol log of the hub-to-hub relay, the intra-org connector
    #: (docs/exchange.md, "Send connectors")
    intra_org_connector_protocol_logging_level: str = "None"
    #: hubport: the password file for SMTP Basic authentication (core/credentials.py)
    password_file_path: Path = Path("var/auth/passwords")
    #: hub-to-hub trust (core/internal_tls.py): None = issued from the organization's CA
    internal_transport_certificate_file: Path | None = None
    internal_transport_certificate_key_file: Path | None = None
    internal_transport_certificate_authority_file: Path | None = None
    #: TCP endpoints of the management endpoint (core/management.py); () = off
    management_bindings: tuple[tuple[str, int], ...] = ()
    #: hubport: how long one plugin's implementation of a stage hook or event may run
    #: (core/hooks.py); ``deliver`` gets its own, longer limit (a whole batch over SMTP)
    plugin_hook_timeout: float = 30.0
    plugin_deliver_timeout: float = HOUR


@dataclass(frozen=True)
class TransportConfig:
    """Set-TransportConfig: organization-wide transport settings."""

    max_send_size: int | None = 10 * MB
    max_receive_size: int | None = 10 * MB
    max_recipient_envelope_limit: int | None = 5000
    external_delay_dsn_enabled: bool = True
    internal_delay_dsn_enabled: bool = True
    external_postmaster_address: str | None = None  # None: postmaster@<default domain>
    generate_copy_of_dsn_for: tuple[str, ...] = DEFAULT_DSN_COPY_CODES
    organization_name: str = "First Organization"
    #: "None" (Exchange: cost picks one connector, and mail waits for it) or "NextCost":
    #: mail moves to the next candidate of the same address space while the chosen
    #: connector's next hop has failed for ``connector_failover_after`` seconds
    connector_failover: str = "None"
    connector_failover_after: float = 300.0


@dataclass(frozen=True)
class Organization:
    """The whole organization, as every daemon sharing the file sees it."""

    source: str  # the file name, or "<embedded default>"
    base_dir: Path
    transport_config: TransportConfig
    accepted_domains: tuple[AcceptedDomain, ...]
    mailboxes: tuple[Mailbox, ...]
    mail_contacts: tuple[MailContact, ...]
    distribution_groups: tuple[DistributionGroup, ...]
    sites: tuple[Site, ...]
    site_links: tuple[SiteLink, ...]
    servers: tuple[TransportServer, ...]
    connectors: tuple[Connector, ...]
    #: plugin modules the `[hubport]` table names (loaded at start, after the entry points)
    plugins: tuple[str, ...] = ()
    #: legacy routing groups (``[[routing_group]]``)
    routing_groups: tuple[RoutingGroup, ...] = ()
    #: mail authentication (core/mail_auth_config.py): DKIM signing per domain, the inbound
    #: checks and the anti-phishing policy
    dkim_signing_configs: tuple[DkimSigningConfig, ...] = ()
    sender_id_config: SenderIdConfig = field(default_factory=SenderIdConfig)
    anti_phish_policy: AntiPhishPolicy = field(default_factory=AntiPhishPolicy)
    #: which version of the file this is: its modification time (ns) when read, 0 for the
    #: embedded default. Hubs compare it when they disagree on a route (core/categorizer.py)
    version: int = 0

    def routing_group(self, name: str) -> RoutingGroup | None:
        wanted = name.lower()
        return next((g for g in self.routing_groups if g.name.lower() == wanted), None)

    @cached_property
    def legacy_servers(self) -> tuple[LegacyServer, ...]:
        """The servers the ExchangeLegacyServers permission group grants its rights to."""
        return legacy_senders(self.routing_groups, self.connectors)

    @cached_property
    def default_domain(self) -> AcceptedDomain:
        """The default accepted domain (postmaster, IMCEA, Message-Ids)."""
        return next((d for d in self.accepted_domains if d.default), self.accepted_domains[0])

    @property
    def postmaster(self) -> str:
        """The DSN sender: ExternalPostmasterAddress, else postmaster@<default domain>."""
        configured = self.transport_config.external_postmaster_address
        return configured or f"postmaster@{self.default_domain.domain_name}"

    def server(self, name: str) -> TransportServer:
        """The transport server called `name` (case-insensitive); KeyError if none."""
        wanted = name.lower()
        for server in self.servers:
            if server.name.lower() == wanted:
                return server
        known = ", ".join(s.name for s in self.servers)
        raise KeyError(f"no transport server named {name!r} in {self.source} (servers: {known})")

    def accepted_domain_for(self, domain: str) -> AcceptedDomain | None:
        """The most specific accepted domain covering `domain`, or None."""
        return _best_domain(self.accepted_domains, domain)

    def connectors_of(self, section: str) -> tuple[Connector, ...]:
        return tuple(c for c in self.connectors if type(c).section == section)

    def connector(self, name: str) -> Connector:
        """The connector called `name` (unique across all types); KeyError if none."""
        for connector in self.connectors:
            if connector.name.lower() == name.lower():
                return connector
        raise KeyError(f"no connector named {name!r}")

    @property
    def recipients(self) -> tuple[Recipient, ...]:
        return (*self.mailboxes, *self.mail_contacts, *self.distribution_groups)

    @cached_property
    def _by_address(self) -> dict[str, Recipient]:
        index: dict[str, Recipient] = {}
        for recipient in self.recipients:
            for address in recipient.smtp_addresses:
                index.setdefault(address.lower(), recipient)
        return index

    def recipient_for_address(self, address: str) -> Recipient | None:
        """The recipient owning SMTP proxy `address` (compared case-insensitively).

        postmaster@ an Authoritative domain that no recipient holds belongs to the
        organization's postmaster (RFC 5321 §4.5.1), see `postmaster_fallback`.
        """
        try:
            key = normalize_address(address).lower()
        except AddressError:
            return None
        return self._by_address.get(key) or self.postmaster_fallback(key)

    @cached_property
    def postmaster_recipient(self) -> Recipient | None:
        """Who reads mail to postmaster (RFC 5321 §4.5.1) where no recipient holds it.

        The holder of postmaster@<default domain>; else the local holder of
        ExternalPostmasterAddress; else the first mailbox aliased Administrator (the mailbox
        Exchange setup creates). None when the organization has none of these: a warning at
        load (`config_warnings`).
        """
        holder = self._by_address.get(f"postmaster@{self.default_domain.domain_name}")
        external = self.transport_config.external_postmaster_address
        if holder is None and external:
            holder = self._by_address.get(external.lower())
        if holder is None:
            holder = next((m for m in self.mailboxes if m.alias.lower() == "administrator"),
                          None)
        return holder

    def postmaster_fallback(self, address: str) -> Recipient | None:
        """`postmaster_recipient` for postmaster@ an Authoritative domain, else None.

        Only the postmaster role gets this: RFC 5321 makes it a MUST for every domain served,
        while abuse@ and the other RFC 2142 names are the organization's to give out. Mail to
        InternalRelay and ExternalRelay domains is relayed on to the system that serves them.
        """
        local, at, domain = address.rpartition("@")
        if not at or local.lower() != "postmaster":
            return None
        accepted = self.accepted_domain_for(domain)
        if accepted is None or accepted.domain_type != "Authoritative":
            return None
        return self.postmaster_recipient

    @property
    def postmaster_delivery_address(self) -> str:
        """The address `RCPT TO:<Postmaster>` (no domain, RFC 5321 §4.5.1) stands for.

        postmaster@<default domain>, which `recipient_for_address` resolves (its holder, or
        the postmaster fallback). Only when that cannot be delivered here (an Authoritative
        default domain and no postmaster recipient at all) does an ExternalPostmasterAddress
        outside the organization take the mail, routed like any external address.
        """
        default = f"postmaster@{self.default_domain.domain_name}"
        if self.default_domain.domain_type != "Authoritative" or \
                self.recipient_for_address(default) is not None:
            return default
        return self.transport_config.external_postmaster_address or default

    @cached_property
    def config_warnings(self) -> tuple[str, ...]:
        """Valid but doubtful settings, logged when the organization is loaded."""
        warnings: list[str] = []
        authoritative = [d.domain_name for d in self.accepted_domains
                         if d.domain_type == "Authoritative"]
        if authoritative and self.postmaster_recipient is None:
            default = f"postmaster@{self.default_domain.domain_name}"
            warnings.append(
                f"no recipient holds {default} and no mailbox has the alias Administrator: "
                f"mail to postmaster@ {', '.join(authoritative)} cannot be delivered and is "
                f"refused with 550 5.1.1, although RFC 5321 §4.5.1 requires it to be "
                f"accepted; add {default} to the EmailAddresses of the mailbox that should "
                "receive it")
        if len(self.servers) > 1:
            unreachable = [
                s.name for s in self.servers
                if not any(str(getattr(c, "server", "")).lower() == s.name.lower()
                           and "exchangeservers" in {str(g).lower() for g in
                                                     getattr(c, "permission_groups", ())}
                           and "ExchangeServer" in getattr(c, "auth_mechanism", ())
                           for c in self.connectors_of("receive_connector"))]
            if unreachable:
                warnings.append(
                    f"no receive connector of {', '.join(unreachable)} has the ExchangeServer"
                    " mechanism and the ExchangeServers permission group: other hubs cannot"
                    " relay to it (their mail for it waits with 4.7.5 or 5.7.1)")
        legacy = [c.name for c in self.connectors
                  if "exchangelegacyservers" in {str(g).lower()
                                                 for g in getattr(c, "permission_groups", ())}]
        if legacy and not self.legacy_servers:
            warnings.append(
                f"the ExchangeLegacyServers permission group on {', '.join(legacy)} grants its"
                " rights to the servers of a legacy routing group that sends to our hubs (a"
                " Bidirectional [[routing_group_connector]]); there is none, so its rights"
                " are unused")
        homeable: list[Mailbox | MailContact] = [*self.mailboxes, *self.mail_contacts]
        homed = {r.routing_group.lower(): r for r in homeable if r.routing_group}
        reached = {str(getattr(c, "target_routing_group", "")).lower()
                   for c in self.connectors if getattr(c, "address_spaces", ())}
        for key, recipient in homed.items():
            group = recipient.routing_group
            if key not in reached:
                warnings.append(
                    f"{recipient.describe()} is homed in routing group {group}"
                    " but no routing group connector leads there: its mail fails with 5.4.4")
        return tuple(warnings)

    def site_cost(self, from_site: str, to_site: str) -> int | None:
        """Lowest total site-link cost between two sites (0 for the same), None if unreachable."""
        path = self.site_path(from_site, to_site)
        return None if path is None else sum(step.cost for step in path)

    def site_path(self, from_site: str, to_site: str) -> list[SiteHop] | None:
        """The least-cost path between two sites, one hop per site link ([] for the same
        site), None if no link reaches it. Ties go to fewer hops, then to site names."""
        names = {s.name.lower(): s.name for s in self.sites}
        start, goal = names.get(from_site.lower()), names.get(to_site.lower())
        if start is None or goal is None:
            return None
        return _cheapest_path(self.site_links, start, goal)


@dataclass(frozen=True)
class SiteHop:
    """One step of a path across sites: the link taken, the site it reaches, its cost."""

    link: str
    site: str
    cost: int
    max_message_size: int | None = None


def _cheapest_path(links: Sequence[SiteLink], start: str, goal: str) -> list[SiteHop] | None:
    """Dijkstra over site links; a link joining n sites joins every pair of them. Paths are
    compared by (cost, hop count, site names), so the choice is the same on every hub; the
    names are compared as Exchange does, from the site just before the destination walking
    back (each path's names are kept in reverse, lower-cased)."""
    graph: dict[str, list[tuple[str, SiteLink]]] = {}
    for link in links:
        for a in link.sites:
            for b in link.sites:
                if a != b:
                    graph.setdefault(a, []).append((b, link))
    first = (start.lower(),)
    best: dict[str, tuple[int, int, tuple[str, ...]]] = {start: (0, 0, first)}
    paths: dict[str, list[SiteHop]] = {start: []}
    heap: list[tuple[int, int, tuple[str, ...], str]] = [(0, 0, first, start)]
    while heap:
        cost, hops, names, site = heapq.heappop(heap)
        if site == goal:
            return paths[site]
        if (cost, hops, names) > best.get(site, (cost, hops, names)):
            continue
        for neighbour, link in graph.get(site, ()):
            key = (cost + link.cost, hops + 1, (neighbour.lower(), *names))
            if neighbour not in best or key < best[neighbour]:
                best[neighbour] = key
                paths[neighbour] = [*paths[site], SiteHop(link.name, neighbour, link.cost,
                                                          link.max_message_size)]
                heapq.heappush(heap, (*key, neighbour))
    return None


def _thresholds(r: FieldReader, stem: str, defaults: Thresholds | None, *,
                count: bool = False) -> Thresholds:
    """``<stem>NormalThreshold``, ``...MediumThreshold``, ``...HighThreshold``: in order.

    ``defaults`` None is a disk resource: 0 (the default) derives a threshold from the volume
    (core/backpressure.py); a Medium or Normal given needs a High given, since a derived High
    depends on the disk and could fall below it.
    """
    names = {level: f"{stem}{level}Threshold" for level in ("Normal", "Medium", "High")}
    values: dict[str, float] = {}
    errors = len(r.ctx.errors)
    for level, key in names.items():
        default = 0.0 if defaults is None else getattr(defaults, level.lower())
        if count:
            values[level] = float(r.int(key, int(default), min=1, max=2147483647) or default)
        else:
            values[level] = r.percent(key, default, min=0.0 if defaults is None else 1.0)
    if len(r.ctx.errors) > errors:  # one clear error per field, not a follow-on about order
        return defaults or DERIVED_DISK_THRESHOLDS
    given = {level: v for level, v in values.items() if v}
    if defaults is None and "High" not in given:
        for level in ("Medium", "Normal"):
            if level in given:
                r.error(names[level], f"needs {names['High']} too (a derived High follows the"
                                      " disk's size and could fall below it)")
                values[level] = 0.0
    order = [level for level in ("Normal", "Medium", "High") if values[level]]
    for low, high in itertools.pairwise(order):
        if values[low] >= values[high]:
            r.error(names[low], f"must be below {names[high]} ({values[high]:g}), got"
                                f" {values[low]:g}")
            return defaults or DERIVED_DISK_THRESHOLDS
    return Thresholds(values["Normal"], values["Medium"], values["High"])


def _best_domain(domains: Sequence[AcceptedDomain], domain: str) -> AcceptedDomain | None:
    best: tuple[int, AcceptedDomain] | None = None
    for candidate in domains:
        score = candidate.matches(domain)
        if score is not None and (best is None or score > best[0]):
            best = (score, candidate)
    return best[1] if best else None


# ---------------------------------------------------------------------------------------------
# loading


def load_organization(
    path: Path | None, connector_types: Mapping[str, type[ConnectorType]],
    delivery_agents: Mapping[str, type] | None = None,
) -> Organization:
    """Load and validate the organization file (None: the embedded default).

    Relative paths in the file resolve against its folder; for the embedded default, against
    the current directory. Raises ConfigErrors listing every problem found.
    """
    if path is None:
        resource = resources.files("hubport.core").joinpath(DEFAULT_RESOURCE)
        text = resource.read_text(encoding="utf-8")
        return parse_organization(
            text, source=EMBEDDED_SOURCE, base_dir=Path.cwd(), connector_types=connector_types,
            delivery_agents=delivery_agents,
        )
    path = Path(path)
    source = str(path)
    try:
        version = path.stat().st_mtime_ns
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigErrors(
            [ConfigError(source, "", None, f"cannot read: {exc.strerror or exc}")]
        ) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigErrors(
            [ConfigError(source, f"line {line}", None, "not UTF-8 text", line=line)]
        ) from None
    return parse_organization(
        text, source=source, base_dir=path.parent, connector_types=connector_types,
        delivery_agents=delivery_agents, version=version,
    )


def parse_organization(
    text: str,
    *,
    source: str,
    base_dir: Path,
    connector_types: Mapping[str, type[ConnectorType]],
    delivery_agents: Mapping[str, type] | None = None,
    version: int = 0,
) -> Organization:
    """Validate TOML text as an organization (management commands check edits with this)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigErrors([_syntax_error(source, str(exc))]) from None
    ctx = ConfigContext(source, base_dir)
    ctx.delivery_agents = dict(delivery_agents or {})  # Delivery Agent connectors check theirs
    return replace(_Loader(data, ctx, connector_types).load(), version=version)


def _syntax_error(source: str, message: str) -> ConfigError:
    """`file: line 3, column 7: TOML syntax error: <what>` from tomllib's message."""
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match:
        reason = message[: match.start()]
        line = int(match[1])
        where = f"line {line}, column {match[2]}"
    else:
        reason = re.sub(r"\s*\(at end of document\)$", "", message)
        line = None
        where = "end of file" if reason != message else ""
    return ConfigError(source, where, None, f"TOML syntax error: {reason}", line=line)


class _Loader:
    """One validation run: reads the sections in dependency order into an Organization."""

    def __init__(
        self,
        data: Mapping[str, Any],
        ctx: ConfigContext,
        connector_types: Mapping[str, type[ConnectorType]],
    ) -> None:
        self.data = data
        self.ctx = ctx
        self.types = dict(connector_types)
        self.sites: tuple[Site, ...] = ()
        self.routing_groups: tuple[RoutingGroup, ...] = ()
        self.domains: tuple[AcceptedDomain, ...] = ()
        self.default_domain = "invalid"

    def load(self) -> Organization:
        self._check_sections()
        self.sites = self._sites()
        self.domains = self._accepted_domains()
        links = self._site_links()
        servers = self._servers()
        self._check_topology(links, servers)
        self.routing_groups = read_routing_groups(self._readers("routing_group"), self.ctx)
        self.ctx.routing_groups = {g.name.lower(): g for g in self.routing_groups}
        transport = self._transport_config()
        mailboxes = self._recipients("mailbox", self._mailbox)
        contacts = self._recipients("mail_contact", self._mail_contact)
        groups = self._recipients("distribution_group", self._group)
        everyone = [*mailboxes, *contacts, *groups]
        self._check_unique_recipients(everyone)
        resolved = self._resolve_members(everyone, groups)
        connectors = self._connectors()
        plugins = self._plugins()
        dkim = read_dkim_signing_configs(self._readers("dkim_signing_config"),
                                         [d.domain_name for d in self.domains])
        sender_id = read_sender_id_config(self._single("sender_id_config"))
        anti_phish = read_anti_phish_policies(self._readers("anti_phish_policy"))[0]
        self.ctx.raise_if_errors()
        return Organization(
            source=self.ctx.file,
            base_dir=self.ctx.base_dir,
            transport_config=transport,
            accepted_domains=self.domains,
            mailboxes=tuple(r for _reader, r in mailboxes),
            mail_contacts=tuple(r for _reader, r in contacts),
            distribution_groups=resolved,
            sites=self.sites,
            site_links=links,
            servers=servers,
            connectors=connectors,
            plugins=plugins,
            routing_groups=self.routing_groups,
            dkim_signing_configs=dkim,
            sender_id_config=sender_id,
            anti_phish_policy=anti_phish,
        )

    # -- sections

    def _check_sections(self) -> None:
        known = [*SECTIONS, *self.types]
        for key in self.data:
            if key in known:
                continue
            hint = suggest(key, known) or f" (known sections: {', '.join(sorted(known))})"
            self.ctx.error(key, None, "unknown section" + hint)

    def _readers(self, section: str) -> Iterator[tuple[int, FieldReader]]:
        """A reader per table of an array-of-tables section (`[[section]]`)."""
        value = self.data.get(section)
        if value is None:
            return
        tables = [value] if isinstance(value, dict) else value
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            self.ctx.error(section, None, f"must be tables, written [[{section}]]")
            tables = [t for t in tables if isinstance(t, dict)] if isinstance(tables, list) else []
        for index, table in enumerate(tables):
            yield index, FieldReader.for_table(section, table, index, self.ctx)

    def _unique(self, seen: dict[str, str], name: str, reader: FieldReader, index: int) -> bool:
        """False (and an error naming the first holder) when `name` is already taken."""
        if not name:
            return False
        key = name.lower()
        if key in seen:
            reader.error("Name", f"name already used by {seen[key]}")
            return False
        seen[key] = f"{reader.object} (entry {index + 1})"
        return True

    # -- sites

    def _sites(self) -> tuple[Site, ...]:
        sites: list[Site] = []
        seen: dict[str, str] = {}
        for index, reader in self._readers("site"):
            site = Site(
                name=reader.name(),
                hub_site_enabled=reader.bool("HubSiteEnabled", False),
                inbound_mail_enabled=reader.bool("InboundMailEnabled", True),
            )
            reader.finish()
            if self._unique(seen, site.name, reader, index):
                sites.append(site)
        if "site" not in self.data:
            sites.append(Site(IMPLICIT_SITE))
        elif self.data["site"] == []:  # `site = []` (an invalid table is reported above)
            self.ctx.error("site", None, "declares no site: write at least one [[site]] "
                                         "table, or leave the section out")
        return tuple(sites)

    def _site_ref(self, reader: FieldReader, key: str, value: str) -> str | None:
        """The declared spelling of a site name, or None (with an error)."""
        for site in self.sites:
            if site.name.lower() == value.strip().lower():
                return site.name
        names = [s.name for s in self.sites]
        reader.error(key, f'no site named "{value}"{suggest(value, names)}')
        return None

    def _site_links(self) -> tuple[SiteLink, ...]:
        links: list[SiteLink] = []
        seen: dict[str, str] = {}
        for index, reader in self._readers("site_link"):
            name = reader.name()
            names = reader.string_list("Sites")
            ad_cost = reader.int("Cost", 100, min=1, max=100)
            exchange_cost = reader.int("ExchangeCost", None, min=1, max=100)
            size = reader.size("MaxMessageSize", default=None)
            reader.finish()
            sites = self._link_sites(reader, names)
            if self._unique(seen, name, reader, index) and sites:
                cost = exchange_cost if exchange_cost is not None else ad_cost
                links.append(SiteLink(name, sites, cost if cost is not None else 100, size))
        return tuple(links)

    def _check_topology(self, links: Sequence[SiteLink], servers: Sequence[TransportServer]
                        ) -> None:
        """With several sites that have transport servers, each of them is on a site link
        and a chain of links joins them: else some hub could never relay to another. A
        site without servers may wait for its links (so cmdlets can build a topology one
        object at a time)."""
        staffed = list(dict.fromkeys(s.site for s in servers))
        if len(self.sites) < 2 or len(staffed) < 2 or self.ctx.errors:
            return
        linked = {site.lower() for link in links for site in link.sites}
        unlinked = [site for site in staffed if site.lower() not in linked]
        for site in unlinked:
            self.ctx.error(f'site "{site}"', None,
                           "is on no site link, and transport servers of other sites could"
                           " never relay to its servers: add it to a [[site_link]] (Sites)")
        if unlinked:
            return
        apart = [site for site in staffed[1:]
                 if _cheapest_path(links, staffed[0], site) is None]
        if apart:
            self.ctx.error(f'site "{staffed[0]}"', None,
                           f"no chain of site links joins it to {', '.join(apart)}: their"
                           " transport servers could never relay to each other")

    def _link_sites(self, reader: FieldReader, names: Sequence[str]) -> tuple[str, ...]:
        """The declared spellings of a link's sites; () when any is wrong."""
        distinct = {n.strip().lower() for n in names}
        if len(distinct) < 2:
            reader.error("Sites", "a site link joins at least two different sites")
            return ()
        resolved = [self._site_ref(reader, "Sites", name) for name in names]
        if any(site is None for site in resolved):
            return ()
        return tuple(dict.fromkeys(site for site in resolved if site is not None))

    # -- accepted domains

    def _accepted_domains(self) -> tuple[AcceptedDomain, ...]:
        kept: list[tuple[FieldReader, AcceptedDomain]] = []
        readers: list[FieldReader] = []
        by_domain: dict[str, str] = {}
        names: dict[str, str] = {}
        for index, reader in self._readers("accepted_domain"):
            readers.append(reader)
            domain = self._accepted_domain(reader)
            if domain is None:
                continue
            if domain.domain_name in by_domain:
                reader.error("DomainName", f"{domain.domain_name} is already declared by "
                                           f"{by_domain[domain.domain_name]}")
                continue
            by_domain[domain.domain_name] = f"{reader.object} (entry {index + 1})"
            if self._unique(names, domain.name, reader, index):
                kept.append((reader, domain))
        self._check_default(readers, kept)
        return tuple(domain for _reader, domain in kept)

    def _accepted_domain(self, reader: FieldReader) -> AcceptedDomain | None:
        name = reader.name()
        raw = reader.string("DomainName", required=True)
        domain = self._domain_name(reader, raw) if raw else None
        domain_type = reader.string("DomainType", "Authoritative", choices=DOMAIN_TYPES)
        default = reader.bool("Default", False)
        address_book = reader.bool("AddressBookEnabled", domain_type == "Authoritative")
        reader.finish()
        if domain is None:
            return None
        if default and domain.startswith("*."):
            reader.error("Default", "a wildcard domain cannot be the default domain")
        return AcceptedDomain(name, domain, domain_type or "Authoritative", default, address_book)

    def _domain_name(self, reader: FieldReader, raw: str) -> str | None:
        text = raw.strip().rstrip(".")
        wildcard = text.startswith("*.")
        base = text[2:] if wildcard else text
        if "*" in base:
            reader.error("DomainName", f'"{raw}": write a domain (contoso.com) or a wildcard '
                                       "covering it and its subdomains (*.contoso.com)")
            return None
        try:
            ascii_base = check_hostname(domain_to_ascii(base))
        except AddressError as exc:
            reader.error("DomainName", f'"{raw}": {exc}')
            return None
        return "*." + ascii_base if wildcard else ascii_base

    def _check_default(
        self, readers: Sequence[FieldReader], kept: Sequence[tuple[FieldReader, AcceptedDomain]]
    ) -> None:
        """Exactly one default accepted domain
        (docs/exchange.md, "Accepted domains and recipients")."""
        if not readers:
            self.ctx.error("accepted_domain", None, "the organization needs at least one "
                                                    "accepted domain, with Default = true")
            return
        defaults = [(r, d) for r, d in kept if d.default]
        if not defaults and kept:
            readers[0].error("Default", "no accepted domain is the default; exactly one must "
                                        "have Default = true")
        for reader, _domain in defaults[1:]:
            reader.error("Default", f'{defaults[0][0].object} is already the default; '
                                    "exactly one accepted domain may be")
        chosen = defaults[0] if defaults else (kept[0] if kept else None)
        if chosen is not None:
            self.default_domain = chosen[1].base_domain

    # -- transport servers

    def _servers(self) -> tuple[TransportServer, ...]:
        servers: list[TransportServer] = []
        seen: dict[str, str] = {}
        readers = list(self._readers("transport_server"))
        if not readers and "transport_server" not in self.data:
            readers = [(0, self.ctx.reader({"Name": IMPLICIT_SERVER},
                                           f'transport_server "{IMPLICIT_SERVER}"'))]
        for index, reader in readers:
            server = self._server(reader)
            reader.finish()
            if self._unique(seen, server.name, reader, index):
                servers.append(server)
                self.ctx.add_server(server.name, server.site, server)
        return tuple(servers)

    def _server(self, r: FieldReader) -> TransportServer:
        name = r.name()
        site_name = r.string("Site")
        # no valid site at all has been reported already; the load fails with that error
        first_site = self.sites[0].name if self.sites else IMPLICIT_SITE
        site = first_site if site_name is None else self._site_ref(r, "Site", site_name)
        state = r.path("StateDirectory", "var")
        assert state is not None
        return TransportServer(
            name=name,
            site=site or first_site,
            fqdn=self._fqdn(r, name),
            state_directory=state,
            **self._directories(r),
            pickup_directory_max_header_size=r.size(
                "PickupDirectoryMaxHeaderSize", 64 * KB, min=32768, max=2147483647,
                unlimited=False),
            pickup_directory_max_recipients_per_message=r.int(
                "PickupDirectoryMaxRecipientsPerMessage", 100, min=1, max=10000),
            pickup_directory_max_messages_per_minute=_zero_is_none(r.int(
                "PickupDirectoryMaxMessagesPerMinute", 100, min=0, max=20000, unlimited=True)),
            folder_rescan_interval=r.duration("FolderRescanInterval", "5s", "0.1s", "1h"),
            folder_settle_time=r.duration("FolderSettleTime", "1s", "0s", "60s"),
            **self._queue_settings(r),
            **self._tracking_settings(r, state),
            external_dns_servers=r.endpoints("ExternalDnsServers"),
            max_outbound_connections=r.int(
                "MaxOutboundConnections", 1000, min=1, max=2147483647, unlimited=True),
            max_per_domain_outbound_connections=r.int(
                "MaxPerDomainOutboundConnections", 20, min=1, max=2147483647, unlimited=True),
            **self._back_pressure_settings(r),
            **self._protocol_log_settings(r, state),
            password_file_path=r.path("PasswordFilePath", state / "auth" / "passwords"),
            **self._internal_transport_certificate(r),
            management_bindings=r.endpoints("ManagementBindings", port=MANAGEMENT_PORT),
        )

    @staticmethod
    def _internal_transport_certificate(r: FieldReader) -> dict[str, Any]:
        """The administrator's own hub certificate and CA (else the organization's CA
        issues one): a key without its certificate is an error."""
        cert = r.path("InternalTransportCertificateFile", None, nullable=True)
        key = r.path("InternalTransportCertificateKeyFile", None, nullable=True)
        authority = r.path("InternalTransportCertificateAuthorityFile", None, nullable=True)
        if key is not None and cert is None:
            r.error("InternalTransportCertificateKeyFile",
                    "needs InternalTransportCertificateFile")
        if authority is not None and cert is None:
            r.error("InternalTransportCertificateAuthorityFile",
                    "needs InternalTransportCertificateFile (this server's certificate from"
                    " that authority: the other hubs check it against the same file)")
        return {
            "internal_transport_certificate_file": cert,
            "internal_transport_certificate_key_file": key,
            "internal_transport_certificate_authority_file": authority,
        }

    def _back_pressure_settings(self, r: FieldReader) -> dict[str, Any]:
        """Back pressure (core/backpressure.py): Exchange's EdgeTransport.exe.config names."""
        return {
            "enable_resource_monitoring": r.bool("EnableResourceMonitoring", True),
            "resource_monitoring_interval": r.duration(
                "ResourceMonitoringInterval", "1s", "1s", "1m"),
            "queue_database_minimum_free_space": r.size(
                "QueueDatabaseMinimumFreeSpace", 100 * MB, min=0, unlimited=False),
            "percentage_database_disk_space_used": _thresholds(
                r, "PercentageDatabaseDiskSpaceUsed", None),
            "log_disk_minimum_free_space": r.size(
                "LogDiskMinimumFreeSpace", 100 * MB, min=0, unlimited=False),
            "percentage_log_disk_space_used": _thresholds(r, "PercentageLogDiskSpaceUsed", None),
            "percentage_private_bytes_used": _thresholds(
                r, "PercentagePrivateBytesUsed", PRIVATE_BYTES_THRESHOLDS),
            "submission_queue_length": _thresholds(
                r, "SubmissionQueueLength", SUBMISSION_QUEUE_THRESHOLDS, count=True),
        }

    def _protocol_log_settings(self, r: FieldReader, state: Path) -> dict[str, Any]:
        """Where the SMTP protocol logs go and how long they are kept
        (docs/exchange.md, "Message tracking and protocol logs")."""
        logs = state / "logs" / "ProtocolLog"
        max_age = r.duration("ProtocolLogMaxAge", "30d", "0s", "24855d")
        return {
            "receive_protocol_log_path": r.path(
                "ReceiveProtocolLogPath", logs / "SmtpReceive", nullable=True),
            "send_protocol_log_path": r.path("SendProtocolLogPath", logs / "SmtpSend",
                                             nullable=True),
            "protocol_log_max_age": max_age or None,
            "protocol_log_max_directory_size": r.size("ProtocolLogMaxDirectorySize", 250 * MB,
                                                      min=1),
            "protocol_log_max_file_size": r.size("ProtocolLogMaxFileSize", 10 * MB, min=1,
                                                 max=4 * GB, unlimited=False),
            "intra_org_connector_protocol_logging_level": r.string(
                "IntraOrgConnectorProtocolLoggingLevel", default="None",
                choices=("None", "Verbose")) or "None",
        }

    def _fqdn(self, reader: FieldReader, name: str) -> str:
        raw = reader.string("Fqdn")
        derived = raw is None
        text = f"{name.lower()}.{self.default_domain}" if derived else raw
        try:
            return check_hostname(domain_to_ascii(str(text).strip().rstrip(".")))
        except AddressError as exc:
            if derived and name:
                reader.error("Fqdn", f'the default "{text}" (from Name) is not a host name '
                                     f"({exc}); set Fqdn")
            elif not derived:
                reader.error("Fqdn", f'"{raw}": {exc}')
            return str(text)

    def _directories(self, r: FieldReader) -> dict[str, Any]:
        pickup = r.path("PickupDirectoryPath", "pickup", nullable=True)
        replay = r.path("ReplayDirectoryPath", "replay", nullable=True)
        if pickup is not None and pickup == replay:
            r.error("ReplayDirectoryPath", "must differ from PickupDirectoryPath")
        return {
            "pickup_directory_path": pickup,
            "replay_directory_path": replay,
            "root_drop_directory_path": r.path("RootDropDirectoryPath", "drop", nullable=True),
        }

    def _queue_settings(self, r: FieldReader) -> dict[str, Any]:
        """Retry ladder, expiry, delay DSN, poison, with Set-TransportServer's ranges
        (docs/exchange.md, "Queues and retry")."""
        return {
            "message_expiration_timeout": r.duration("MessageExpirationTimeout", "2d", "5s", "90d"),
            "delay_notification_timeout": r.duration("DelayNotificationTimeout", "4h", "1s", "30d"),
            "queue_glitch_retry_count": r.int("QueueGlitchRetryCount", 4, min=0, max=15),
            "queue_glitch_retry_interval": r.duration(
                "QueueGlitchRetryInterval", "1m", "1s", "1h"),
            "transient_failure_retry_count": r.int("TransientFailureRetryCount", 6, min=0, max=15),
            "transient_failure_retry_interval": r.duration(
                "TransientFailureRetryInterval", "5m", "1s", "12h"),
            "outbound_connection_failure_retry_interval": r.duration(
                "OutboundConnectionFailureRetryInterval", "10m", "1s", "20d"),
            "message_retry_interval": r.duration("MessageRetryInterval", "1m", "1s", "1d"),
            "queue_max_idle_time": r.duration("QueueMaxIdleTime", "3m", "5s", "1h"),
            "poison_threshold": r.int("PoisonThreshold", 2, min=1, max=10),
            "poison_message_detection_enabled": r.bool("PoisonMessageDetectionEnabled", True),
            "plugin_hook_timeout": r.duration("PluginHookTimeout", "30s", "0.1s", "1h"),
            "plugin_deliver_timeout": r.duration("PluginDeliverTimeout", "1h", "1s", "1d"),
        }

    def _tracking_settings(self, r: FieldReader, state: Path) -> dict[str, Any]:
        """The message tracking log of this server
        (docs/exchange.md, "Message tracking and protocol logs")."""
        max_dir = r.size("MessageTrackingLogMaxDirectorySize", GB, min=1)
        max_file = r.size("MessageTrackingLogMaxFileSize", 10 * MB, min=1, max=4 * GB,
                          unlimited=False)
        if max_dir is not None and max_file is not None and max_file > max_dir:
            r.error("MessageTrackingLogMaxFileSize",
                    "must not exceed MessageTrackingLogMaxDirectorySize")
        max_age = r.duration("MessageTrackingLogMaxAge", "30d", "0s", "24855d")
        return {
            "message_tracking_log_enabled": r.bool("MessageTrackingLogEnabled", True),
            "message_tracking_log_path": r.path(
                "MessageTrackingLogPath", state / "logs" / "MessageTracking"),
            "message_tracking_log_max_age": max_age or None,
            "message_tracking_log_max_directory_size": max_dir,
            "message_tracking_log_max_file_size": max_file,
            "message_tracking_log_subject_logging_enabled": r.bool(
                "MessageTrackingLogSubjectLoggingEnabled", True),
        }

    # -- transport config

    def _plugins(self) -> tuple[str, ...]:
        """`[hubport] Plugins`: dotted module names (a module beside the file is found)."""
        value = self.data.get("hubport")
        if value is None:
            return ()
        if not isinstance(value, dict):
            self.ctx.error("hubport", None, "must be one table, written [hubport]")
            return ()
        r = self.ctx.reader(value, "hubport")
        modules = r.string_list("Plugins", ())
        for module in modules:
            if not all(part.isidentifier() for part in module.split(".")):
                r.error("Plugins", f"{module!r} is not a dotted Python module name")
        r.finish()
        return modules

    def _single(self, section: str) -> FieldReader | None:
        """The reader of a section that is one table (``[transport_config]``), or None."""
        value = self.data.get(section)
        if value is None:
            return None
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
            value = value[0]
        if not isinstance(value, dict):
            self.ctx.error(section, None, f"must be one table, written [{section}]")
            return None
        return self.ctx.reader(value, section)

    def _transport_config(self) -> TransportConfig:
        r = self._single("transport_config")
        if r is None:
            return TransportConfig()
        config = TransportConfig(
            max_send_size=r.size("MaxSendSize", 10 * MB),
            max_receive_size=r.size("MaxReceiveSize", 10 * MB),
            max_recipient_envelope_limit=r.int(
                "MaxRecipientEnvelopeLimit", 5000, min=0, max=2147483647, unlimited=True),
            external_delay_dsn_enabled=r.bool("ExternalDelayDsnEnabled", True),
            internal_delay_dsn_enabled=r.bool("InternalDelayDsnEnabled", True),
            external_postmaster_address=r.smtp_address("ExternalPostmasterAddress"),
            generate_copy_of_dsn_for=self._dsn_codes(r),
            organization_name=self._organization_name(r),
            connector_failover=r.string("ConnectorFailover", "None",
                                        choices=("None", "NextCost")),
            connector_failover_after=r.duration("ConnectorFailoverAfter", "5m", "1s",
                                                "7d") or 300.0,
        )
        r.finish()
        return config

    def _organization_name(self, r: FieldReader) -> str:
        name = r.string("OrganizationName", "First Organization") or ""
        if not name.strip():
            r.error("OrganizationName", "must not be empty")
            return "First Organization"
        return name

    def _dsn_codes(self, r: FieldReader) -> tuple[str, ...]:
        codes = r.string_list("GenerateCopyOfDSNFor", DEFAULT_DSN_COPY_CODES)
        for code in codes:
            if not _DSN_CODE.fullmatch(code.strip()):
                r.error("GenerateCopyOfDSNFor", f'"{code}" is not an enhanced status code '
                                                "such as 5.4.8")
        return tuple(c.strip() for c in codes if _DSN_CODE.fullmatch(c.strip()))

    # -- recipients

    def _recipients(self, section: str, build: Any) -> list[tuple[FieldReader, Any]]:
        built = []
        for _index, reader in self._readers(section):
            recipient = build(reader)
            reader.finish()
            if recipient is not None:
                built.append((reader, recipient))
        return built

    def _mailbox(self, r: FieldReader) -> Mailbox | None:
        name = r.name()
        alias = self._alias(r, name)
        primary, proxies = self._proxy_addresses(r, alias)
        first_server = next(iter(self.ctx.servers), None)
        group = self._routing_group_ref(r)
        if group and r.has("Server"):
            r.error("RoutingGroup", "a mailbox is homed on a transport server (Server) or in"
                                    " a legacy routing group (RoutingGroup), not both")
        return Mailbox(
            name=name,
            alias=alias,
            primary_smtp_address=primary,
            email_addresses=proxies,
            server=None if group else r.server("Server", first_server),
            routing_group=group,
            max_receive_size=r.size("MaxReceiveSize", None),
            password_hash=r.string("PasswordHash"),
        )

    def _mail_contact(self, r: FieldReader) -> MailContact | None:
        name = r.name()
        alias = self._alias(r, name)
        external = self._external_address(r)
        primary, proxies = self._proxy_addresses(r, alias, exempt=external)
        group = self._routing_group_ref(r)
        return MailContact(name, alias, external or "", primary, proxies, group)

    def _routing_group_ref(self, r: FieldReader) -> str | None:
        """A recipient's ``RoutingGroup``: the declared spelling, None (with an error)."""
        value = r.string("RoutingGroup")
        if value is None:
            return None
        group = next((g for g in self.routing_groups
                      if g.name.lower() == value.strip().lower()), None)
        if group is None:
            names = [g.name for g in self.routing_groups]
            r.error("RoutingGroup", f'no routing group named "{value}"{suggest(value, names)}')
            return None
        return group.name

    def _group(self, r: FieldReader) -> DistributionGroup | None:
        name = r.name()
        alias = self._alias(r, name)
        primary, proxies = self._proxy_addresses(r, alias)
        return DistributionGroup(name, alias, primary, proxies, r.string_list("Members"))

    def _alias(self, r: FieldReader, name: str) -> str:
        """Alias (mailNickname); by default the Name without spaces, as Exchange derives it."""
        alias = r.string("Alias")
        if alias is None:
            derived = name.replace(" ", "")
            problem = _alias_problem(derived) if name else None
            if problem:
                r.error("Alias", f'cannot derive an alias from Name "{name}" ({problem}); '
                                 "set Alias")
            return derived
        problem = _alias_problem(alias)
        if problem:
            r.error("Alias", f'"{alias}": {problem}')
        return alias

    def _external_address(self, r: FieldReader) -> str | None:
        raw = r.string("ExternalEmailAddress", required=True)
        if raw is None or not raw.strip():
            return None
        try:
            kind, address, _primary = parse_proxy_address(raw)
        except AddressError as exc:
            r.error("ExternalEmailAddress", f'"{raw}": {exc}')
            return None
        return f"{kind}:{address}"

    def _proxy_addresses(
        self, r: FieldReader, alias: str, exempt: str | None = None
    ) -> tuple[str, tuple[str, ...]]:
        """(primary, EmailAddresses in proxy form with `SMTP:<primary>` first)."""
        explicit = r.smtp_address("PrimarySmtpAddress")
        marked: list[str] = []
        secondary: list[str] = []
        other: list[str] = []
        for entry in r.string_list("EmailAddresses"):
            try:
                kind, address, is_primary = parse_proxy_address(entry)
            except AddressError as exc:
                r.error("EmailAddresses", f'"{entry}": {exc}')
                continue
            if kind != "SMTP":
                other.append(f"{entry.strip().partition(':')[0]}:{address}")
            else:
                (marked if is_primary else secondary).append(address)
        if len(marked) > 1:
            r.error("EmailAddresses", f"more than one primary address ({', '.join(marked)}); "
                                      "write secondary addresses with a lower-case smtp: prefix")
        if explicit and marked and explicit.lower() != marked[0].lower():
            r.error("PrimarySmtpAddress", f"{explicit} differs from the primary "
                                          f"SMTP:{marked[0]} in EmailAddresses")
        primary = explicit or (marked[0] if marked else self._default_address(r, alias))
        self._check_domains(r, [primary], "PrimarySmtpAddress" if explicit else
                            "EmailAddresses" if marked else None, exempt)
        self._check_domains(r, secondary + marked[1:], "EmailAddresses", exempt)
        return primary, _proxy_list(primary, secondary + marked[1:], other)

    def _default_address(self, r: FieldReader, alias: str) -> str:
        try:
            return normalize_address(f"{alias}@{self.default_domain}")
        except AddressError:
            return f"{alias}@{self.default_domain}"  # the alias error is already recorded

    def _check_domains(
        self, r: FieldReader, addresses: Sequence[str], field: str | None, exempt: str | None
    ) -> None:
        """Proxy addresses live in accepted domains (an external contact address need not)."""
        if field is None:
            return
        for address in addresses:
            if exempt and f"SMTP:{address}".lower() == exempt.lower():
                continue
            domain = address.rpartition("@")[2]
            if _best_domain(self.domains, domain) is None and self.domains:
                r.error(field, f"{address}: {domain} is not an accepted domain")

    def _check_unique_recipients(self, everyone: Sequence[tuple[FieldReader, Any]]) -> None:
        """Names, aliases and proxy addresses each belong to one recipient only."""
        names: dict[str, FieldReader] = {}
        aliases: dict[str, FieldReader] = {}
        proxies: dict[str, FieldReader] = {}
        for reader, recipient in everyone:
            if recipient.name:
                holder = names.setdefault(recipient.name.lower(), reader)
                if holder is not reader:
                    reader.error("Name", f"name already used by {_earlier(holder, reader)}")
            if recipient.alias:
                holder = aliases.setdefault(recipient.alias.lower(), reader)
                if holder is not reader:
                    reader.error("Alias", f"alias {recipient.alias} is already used by "
                                          f"{_earlier(holder, reader)}")
            for proxy in recipient.email_addresses:
                holder = proxies.setdefault(_proxy_key(proxy), reader)
                if holder is not reader:
                    field = "PrimarySmtpAddress" if proxy.startswith("SMTP:") else "EmailAddresses"
                    shown = proxy.partition(":")[2]
                    reader.error(field, f"{shown} is already an address of "
                                        f"{_earlier(holder, reader)}")

    def _resolve_members(
        self, everyone: Sequence[tuple[FieldReader, Any]], groups: Sequence[tuple[FieldReader, Any]]
    ) -> tuple[DistributionGroup, ...]:
        """Members name recipients (Name, Alias or SMTP address); stored as primary addresses."""
        lookup: dict[str, Any] = {}
        for _reader, recipient in everyone:
            for address in recipient.smtp_addresses:
                lookup.setdefault(address.lower(), recipient)
        for _reader, recipient in everyone:
            lookup.setdefault(recipient.alias.lower(), recipient)
        for _reader, recipient in reversed(everyone):
            lookup[recipient.name.lower()] = recipient  # a name wins over an alias
        resolved = []
        for reader, group in groups:
            members: list[str] = []
            for member in group.members:
                target = lookup.get(_member_key(member))
                if target is None:
                    reader.error("Members", f'"{member}" is not a mailbox, mail contact or '
                                            "distribution group of this organization")
                elif target is group:
                    reader.error("Members", "a group cannot be a member of itself")
                elif target.primary_smtp_address not in members:
                    members.append(target.primary_smtp_address)
            resolved.append(DistributionGroup(
                group.name, group.alias, group.primary_smtp_address, group.email_addresses,
                tuple(members)))
        return tuple(resolved)

    # -- connectors

    def _connectors(self) -> tuple[Connector, ...]:
        """Each registered type reads its own section; names are unique across all types."""
        connectors: list[Connector] = []
        seen: dict[str, str] = {}
        for section, cls in self.types.items():
            for index, reader in self._readers(section):
                try:
                    connector = cls.from_config(reader, self.ctx)
                except ConfigError as exc:
                    self.ctx.add(exc)
                    continue
                reader.finish()
                if self._unique(seen, connector.name, reader, index):
                    connectors.append(connector)
                    companions = getattr(connector, "companions", None)
                    for companion in companions() if companions is not None else ():
                        if self._unique(seen, companion.name, reader, index):
                            connectors.append(companion)
        for cls in self.types.values():
            own = [c for c in connectors if type(c) is cls]
            check_all = getattr(cls, "check_all", None)
            if check_all is not None:  # rules across the objects of one type
                check_all(own, self.ctx)
            check_across = getattr(cls, "check_across", None)
            if check_across is not None:  # rules that name connectors of other types
                check_across(own, connectors, self.ctx)
        return tuple(connectors)


def _earlier(holder: FieldReader, reader: FieldReader) -> str:
    """The first holder of a name, told apart from `reader` when both print the same."""
    return holder.object + (" (declared earlier)" if holder.object == reader.object else "")


def _zero_is_none(value: int | None) -> int | None:
    return None if value == 0 else value


def _alias_problem(alias: str) -> str | None:
    if not alias:
        return "must not be empty"
    if len(alias) > 64:
        return f"longer than 64 characters ({len(alias)})"
    if not _ALIAS_CHARS.fullmatch(alias):
        return "may hold only letters, digits, . and !#$%&'*+-/=?^_`{|}~"
    if alias.startswith(".") or alias.endswith(".") or ".." in alias:
        return "must not start or end with a dot or hold two dots in a row"
    return None


def _proxy_list(primary: str, secondary: Sequence[str], other: Sequence[str]) -> tuple[str, ...]:
    result = [f"SMTP:{primary}"]
    seen = {_proxy_key(result[0])}
    for proxy in [*(f"smtp:{a}" for a in secondary), *other]:
        if _proxy_key(proxy) not in seen:
            seen.add(_proxy_key(proxy))
            result.append(proxy)
    return tuple(result)


def _proxy_key(proxy: str) -> str:
    """Proxy addresses compare case-insensitively, whatever the prefix's case (primary flag)."""
    return proxy.lower()


def _member_key(member: str) -> str:
    text = member.strip()
    if "@" in text:
        try:
            return normalize_address(text).lower()
        except AddressError:
            return text.lower()
    return text.lower()


def plugin_modules(path: Path | None) -> tuple[str, ...]:
    """The `[hubport] Plugins` of a file, read before the full load.

    Plugins may add connector sections, so they must be registered before the organization
    is validated; errors in the file are left to the full load to report.
    """
    if path is None or not isinstance(path, Path):  # a store's URL: entry points only
        return ()
    try:
        # decoded as the full load decodes it (a BOM is allowed); a file that is not UTF-8
        # is the full load's to report, with its line
        data = tomllib.loads(Path(path).read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return ()
    table = data.get("hubport")
    if not isinstance(table, dict):
        return ()
    for key, value in table.items():
        if key.lower() == "plugins" and isinstance(value, list):
            return tuple(v for v in value if isinstance(v, str))
    return ()
