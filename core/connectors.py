"""The contract between the core and connector types (Send, Foreign, Delivery Agent ...).

A connector type is a class handed to the core through the `register_connector_types`
hook. The core knows it only through this contract: the config section it reads, how it
builds an instance from that section, the common routing fields every connector has, and an
optional lifecycle (`start`/`stop`) the daemon drives for the instances scoped to a server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeGuard

from hubport.core.address_space import AddressSpace

if TYPE_CHECKING:
    from hubport.core.config_fields import ConfigContext, FieldReader


@dataclass
class Connector:
    """Fields every routable connector shares
    (docs/exchange.md, "Address spaces and connector selection")."""

    name: str
    address_spaces: tuple[AddressSpace, ...] = ()
    source_transport_servers: tuple[str, ...] = ()
    is_scoped_connector: bool = False
    enabled: bool = True
    max_message_size: int | None = None  # None = unlimited
    extra: dict[str, Any] = field(default_factory=dict)

    #: the config section (TOML array of tables) this type reads, e.g. "foreign_connector"
    section: ClassVar[str] = ""
    #: the queue DeliveryType of its next hops, e.g. "NonSmtpGatewayDelivery"
    delivery_type: ClassVar[str] = ""
    #: the Exchange object class shown in messages, e.g. "ForeignConnector"
    kind: ClassVar[str] = "Connector"

    @classmethod
    def read_common(cls, reader: FieldReader, ctx: ConfigContext, *,
                    address_spaces_required: bool = True) -> dict[str, Any]:
        """Read the fields of this base class; a subclass adds its own."""
        return {
            "name": reader.name(),
            "address_spaces": reader.address_spaces("AddressSpaces",
                                                    required=address_spaces_required),
            "source_transport_servers": reader.server_list(
                "SourceTransportServers", default=ctx.default_source_servers()
            ),
            "is_scoped_connector": reader.bool("IsScopedConnector", default=False),
            "enabled": reader.bool("Enabled", default=True),
            "max_message_size": reader.size("MaxMessageSize", default=None),
        }

    def summary(self) -> str:
        """One line for ``hubport test-config``: what it serves and where it runs."""
        parts = [", ".join(str(s) for s in self.address_spaces)] if self.address_spaces else []
        if self.source_transport_servers:
            parts.append("from " + ", ".join(self.source_transport_servers))
        line = f'{self.kind} "{self.name}"' + (": " + " ".join(parts) if parts else "")
        return line + ("" if self.enabled else "; disabled")

    def secret_files(self) -> tuple[Path, ...]:
        """Server-local files holding its secrets (a smart host's password file): what
        ``hubport export-secrets`` copies for a new hub that hosts it."""
        return ()

    def companions(self) -> tuple[Connector, ...]:
        """Objects this one creates beside itself (a Bidirectional Routing Group
        connector's reciprocal): the loader adds them to the organization."""
        return ()

    def next_hop_domain(self, space: AddressSpace, address: str = "") -> str:
        """NextHopDomain of the queue recipient `address` matched through `space` lands in
        (a queue per value: one next hop whose failure puts the queue in Retry)."""
        return space.space if space.type == "SMTP" else space.type


class ConnectorType(Protocol):
    """What `register_connector_types` registers: a class with these members."""

    section: ClassVar[str]
    delivery_type: ClassVar[str]
    kind: ClassVar[str]

    @classmethod
    def from_config(cls, reader: FieldReader, ctx: ConfigContext) -> Connector: ...


def is_connector_type(cls: type) -> TypeGuard[type[ConnectorType]]:
    """Whether a registered class has what the loader calls (checked at registration)."""
    return bool(getattr(cls, "section", "")) and hasattr(cls, "from_config")
