"""Send connectors: SMTP delivery by MX or through smart hosts, and the hub-to-hub relay.

``[[send_connector]]`` (New-SendConnector; docs/exchange.md, "Send connectors"): Usage,
AddressSpaces, SourceTransportServers, IsScopedConnector, Enabled, MaxMessageSize,
DNSRoutingEnabled, UseExternalDNSServersEnabled, SmartHosts, Port, SmartHostAuthMechanism,
AuthenticationCredential, RequireTLS, IgnoreSTARTTLS, TlsAuthLevel, TlsDomain, Fqdn,
ForceHELO, SmtpMaxMessagesPerConnection, ConnectionInactivityTimeOut, ErrorPolicies,
ProtocolLoggingLevel, LinkedReceiveConnector; hubport extensions TlsCertificateAuthorityFile,
TlsClientCertificateFile and TlsClientKeyFile.

ErrorPolicies supported: ``Default`` (a 5xx greeting/EHLO or a refused AUTH fails the
messages with the remote reply; NXDOMAIN bounces with 5.4.4), ``DowngradeAuthFailures`` (a
refused AUTH defers with 4.7.3 instead), ``DowngradeDnsFailures`` (NXDOMAIN and "no address
for any MX host" defer with 4.4.x instead; a null MX still bounces: the domain says so).
TLS failures always defer (4.7.x) and never fall back to plaintext when TLS is required.

Modules: ``connector`` (config), ``resolver`` (MX / smart hosts / hub relay),
``policy`` (TLS and AUTH), ``session`` (one SMTP client connection), ``content`` (header
firewall, 8-bit downgrade, DSN parameters), ``protolog`` (protocol log adapter) and
``delivery`` (the deliver hook body), ``linked`` (linked connectors: the categorize hook's
routing override and the loop guard).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hubport.core import hookimpl
from hubport.core.api import DeliveryContext, MailItem, Organization, QueuedMessage
from hubport.core.model import NextHop, QueuedRecipient
from hubport.plugins.smtp_send.connector import SendConnector
from hubport.plugins.smtp_send.delivery import RELAY_TYPES, deliver_items
from hubport.plugins.smtp_send.delivery import probe_next_hop as probe
from hubport.plugins.smtp_send.linked import route_through_link
from hubport.plugins.smtp_send.routing_group import RoutingGroupConnector

__all__ = ["RELAY_TYPES", "RoutingGroupConnector", "SendConnector", "categorize", "deliver",
           "register_connector_types"]


@hookimpl
def register_connector_types(register: Callable[[type], None]) -> None:
    register(SendConnector)
    register(RoutingGroupConnector)


@hookimpl
async def deliver(next_hop: NextHop, connector: Any, items: list[MailItem],
                  context: DeliveryContext) -> Any:
    """Send connectors and Routing Group connectors hosted here, and every relay queue to
    another hub."""
    if next_hop.delivery_type in RELAY_TYPES or \
            isinstance(connector, (SendConnector, RoutingGroupConnector)):
        return await deliver_items(next_hop, connector, items, context)
    return None


@hookimpl
async def probe_next_hop(next_hop: NextHop, connector: Any,
                         context: DeliveryContext) -> bool | None:
    """Send connectors: whether their smart hosts (or MX hosts) answer again."""
    if not isinstance(connector, SendConnector):
        return None
    return await probe(next_hop, connector, context)


@hookimpl
def categorize(message: QueuedMessage, recipient: QueuedRecipient,
               organization: Organization) -> Any:
    """Linked connectors: mail from a linked receive connector goes to its send connector
    whatever its recipients (plugins/smtp_send/linked.py)."""
    return route_through_link(message, organization)
