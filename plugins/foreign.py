"""Foreign connectors: deliver to a non-SMTP gateway by writing files into a Drop directory.

``[[foreign_connector]]`` (New-ForeignConnector): AddressSpaces, DropDirectory (relative to
the server's RootDropDirectoryPath, or absolute), DropDirectoryQuota, MaxMessageSize,
SourceTransportServers, IsScopedConnector, Enabled, RelayDsnRequired. The files are written
by the built-in Drop directory agent in the Replay format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from hubport.agents.drop import DropDirectoryAgent
from hubport.core import hookimpl
from hubport.core.agent_runner import run_agent
from hubport.core.api import DeliveryContext, MailItem
from hubport.core.config_fields import ConfigContext, FieldReader
from hubport.core.connectors import Connector
from hubport.core.model import NextHop

if TYPE_CHECKING:
    from hubport.core.config import TransportServer


@dataclass
class ForeignConnector(Connector):
    drop_directory: str = ""
    drop_directory_quota: int | None = None
    relay_dsn_required: bool = False
    create_drop_directory: bool = False

    section: ClassVar[str] = "foreign_connector"
    delivery_type: ClassVar[str] = "NonSmtpGatewayDelivery"
    kind: ClassVar[str] = "ForeignConnector"

    @classmethod
    def from_config(cls, reader: FieldReader, ctx: ConfigContext) -> ForeignConnector:
        common = cls.read_common(reader, ctx)
        drop = reader.string("DropDirectory", default=None) or common["name"]
        if not Path(drop).is_absolute():
            parts = Path(drop).parts
            if any(p in ("..", ".") for p in parts) or "\\" in drop or "\x00" in drop:
                reader.error("DropDirectory", "must name a folder inside the server's"
                             " RootDropDirectoryPath (no '..', '.' or backslashes)")
            for name in common["source_transport_servers"]:
                server = ctx.transport_servers.get(name)
                if server is not None and server.root_drop_directory_path is None:
                    reader.error("DropDirectory", f'"{drop}" is relative, but source transport'
                                 f' server "{name}" has no RootDropDirectoryPath (it is empty);'
                                 " give an absolute path or set the server's"
                                 " RootDropDirectoryPath")
        return cls(**common,
                   drop_directory=drop,
                   drop_directory_quota=reader.size("DropDirectoryQuota", default=None),
                   relay_dsn_required=reader.bool("RelayDsnRequired", default=False),
                   create_drop_directory=reader.bool("CreateDropDirectory", default=False))

    def drop_path(self, server: TransportServer) -> Path:
        """The Drop directory on ``server``: absolute as given, else under its drop root."""
        path = Path(self.drop_directory)
        if path.is_absolute():
            return path
        if server.root_drop_directory_path is None:  # the load refuses this on source servers
            raise ValueError(f"{self.kind} {self.name!r}: transport server {server.name!r} has"
                             " no RootDropDirectoryPath for the relative DropDirectory"
                             f" {self.drop_directory!r}")
        return server.root_drop_directory_path / path


@hookimpl
def register_connector_types(register: Callable[[type], None]) -> None:
    register(ForeignConnector)


@hookimpl
async def deliver(next_hop: NextHop, connector: Any, items: list[MailItem],
                  context: DeliveryContext) -> Any:
    if not isinstance(connector, ForeignConnector):
        return None
    return await run_agent(DropDirectoryAgent, connector, next_hop, items, context)
