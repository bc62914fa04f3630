"""hubport's public API: the one module a plugin or delivery-agent author imports from.

::

    from hubport.core.api import DeliveryAgent, ItemResult, MailItem, SmtpResponse, hookimpl

Everything in ``__all__`` is the contract, described in docs/reference.md (signatures and
return types), docs/hooks.md (the hooks) and docs/agents.md (writing an agent). Anything
else in hubport is internal and may change between releases. The test kit is the pytest
plugin ``hubport.plugins.pytest_plugin`` (docs/agents.md, "Testing it").

Modules inside ``hubport.core`` never import this one: it sits on top of them.
"""

from __future__ import annotations

from hubport.core import __version__, hookimpl, hookspec
from hubport.core.address_space import AddressSpace
from hubport.core.agent_runner import run_agent, run_connections
from hubport.core.body import MessageBody
from hubport.core.categorizer import (
    CategorizeResult,
    Decision,
    Expand,
    Redirect,
    Reject,
    RouteTo,
)
from hubport.core.config import Organization, TransportServer
from hubport.core.config_fields import ConfigContext, ConfigError, FieldReader
from hubport.core.connectors import Connector, ConnectorType
from hubport.core.delivery import (
    DEFERRED,
    DELIVERED,
    FAILED,
    LOCAL_ERROR,
    OK,
    DeferQueue,
    DeliveryAgent,
    DeliveryContext,
    FailQueue,
    ItemResult,
    MailItem,
    RecipientAddress,
    RecipientResult,
    recipient_address,
)
from hubport.core.directory import RecipientDirectory
from hubport.core.folder_writer import FolderWriter
from hubport.core.headers import ParsedMessage
from hubport.core.model import (
    Envelope,
    EnvelopeRecipient,
    Inspection,
    MailFrom,
    NextHop,
    Notify,
    QueuedMessage,
    QueuedRecipient,
    ReceiveSession,
    RecipientStatus,
    SmtpResponse,
    Submission,
    SubmitResult,
)
from hubport.core.routing import RouteCandidate

__all__ = [
    "DEFERRED",
    "DELIVERED",
    "FAILED",
    "LOCAL_ERROR",
    "OK",
    "AddressSpace",
    "CategorizeResult",
    "ConfigContext",
    "ConfigError",
    "Connector",
    "ConnectorType",
    "Decision",
    "DeferQueue",
    "DeliveryAgent",
    "DeliveryContext",
    "Envelope",
    "EnvelopeRecipient",
    "Expand",
    "FailQueue",
    "FieldReader",
    "FolderWriter",
    "Inspection",
    "ItemResult",
    "MailFrom",
    "MailItem",
    "MessageBody",
    "NextHop",
    "Notify",
    "Organization",
    "ParsedMessage",
    "QueuedMessage",
    "QueuedRecipient",
    "ReceiveSession",
    "RecipientAddress",
    "RecipientDirectory",
    "RecipientResult",
    "RecipientStatus",
    "Redirect",
    "Reject",
    "RouteCandidate",
    "RouteTo",
    "SmtpResponse",
    "Submission",
    "SubmitResult",
    "TransportServer",
    "__version__",
    "hookimpl",
    "hookspec",
    "recipient_address",
    "run_agent",
    "run_connections",
]
