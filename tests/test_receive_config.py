"""`[[receive_connector]]` validation, ranges and rights
(docs/exchange.md, "Receive connectors and permission groups")."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from hubport.core.config import parse_organization
from hubport.core.config_fields import ConfigErrors
from hubport.plugins.smtp_receive.connector import ReceiveConnector
from hubport.plugins.smtp_receive.permissions import Principal, Right, rights_for
from hubport.plugins.smtp_receive.ranges import parse_range

BASE = """
[[accepted_domain]]
Name = "contoso.test"
DomainName = "contoso.test"
Default = true

[[transport_server]]
Name = "HUB01"
"""


def load(tables: str):
    return parse_organization(BASE + tables, source="org.toml", base_dir=Path("/tmp"),
                              connector_types={"receive_connector": ReceiveConnector})


def errors(tables: str) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        load(tables)
    return [str(e) for e in info.value]


def connector(tables: str) -> ReceiveConnector:
    (found,) = load(tables).connectors_of("receive_connector")
    assert isinstance(found, ReceiveConnector)
    return found


def test_defaults_follow_exchange_2010() -> None:
    c = connector('[[receive_connector]]\nName = "Default HUB01"\nBindings = ["0.0.0.0:25"]\n')
    assert c.server == "HUB01" and c.bindings == (("0.0.0.0", 25),)
    assert c.max_message_size == 10 * 1024 * 1024 and c.max_header_size == 64 * 1024
    assert c.max_recipients_per_message == 200 and c.max_hop_count == 30
    assert c.max_local_hop_count == 8 and c.max_logon_failures == 3
    assert c.max_protocol_errors == 5 and c.tarpit_interval == 5
    assert c.connection_timeout == 600 and c.connection_inactivity_timeout == 300
    assert c.max_inbound_connection == 5000 and c.max_inbound_connection_per_source == 20
    assert c.auth_mechanism == {"Tls"} and c.permission_groups == frozenset()
    assert c.bare_line_endings == "Reject"


@pytest.mark.parametrize(("usage", "auth", "groups"), [
    ("Internet", {"Tls"}, {"AnonymousUsers"}),
    ("Client", {"Tls", "BasicAuth", "BasicAuthRequireTLS"}, {"ExchangeUsers"}),
    ("Internal", {"Tls", "ExchangeServer"}, {"ExchangeServers"}),
    ("Partner", {"Tls"}, {"Partners"}),
])
def test_usage_templates_set_auth_and_groups(usage: str, auth: set, groups: set) -> None:
    c = connector(f'[[receive_connector]]\nName = "R"\nBindings = ["0.0.0.0:25"]\n'
                  f'Usage = "{usage}"\n')
    assert c.auth_mechanism == auth and c.permission_groups == groups
    assert (c.max_line_length == 998) == (usage == "Internet")


@pytest.mark.parametrize(("fields", "field", "reason"), [
    ('AuthMechanism = ["Tls", "Integrated"]', "AuthMechanism", "Integrated"),
    ('AuthMechanism = ["None", "Tls"]', "AuthMechanism", "None must be used alone"),
    ('AuthMechanism = ["BasicAuthRequireTLS"]', "AuthMechanism", "requires BasicAuth and Tls"),
    ('AuthMechanism = ["ExternalAuthoritative"]\nPermissionGroups = ["AnonymousUsers"]',
     "PermissionGroups", "requires PermissionGroups ExchangeServers"),
    ('AuthMechanism = ["ExternalAuthoritative", "BasicAuth"]\n'
     'PermissionGroups = ["ExchangeServers"]', "AuthMechanism", "only be combined with Tls"),
    ('AuthMechanism = ["None"]\nRequireTLS = true', "RequireTLS", "requires the Tls"),
    ('Banner = "hello"', "Banner", 'must start with "220 "'),
    ('ConnectionTimeout = "1m"\nConnectionInactivityTimeout = "5m"', "ConnectionTimeout",
     "greater than"),
    ('RemoteIPRanges = ["10.0.0.300"]', "RemoteIPRanges", "not an IP address"),
    ('RemoteIPRanges = ["10.0.0.9-10.0.0.1"]', "RemoteIPRanges", "starts after it ends"),
    ("ChunkingEnabled = true", "ChunkingEnabled", "not implemented"),
    ('PermissionGroups = ["Everyone"]', "PermissionGroups", "is not one of"),
    ("MaxMessageSize = 1000", "MaxMessageSize", ""),
    ("MaxHopCount = 501", "MaxHopCount", ""),
    ("TarpitIntervall = 1", "TarpitIntervall", "did you mean"),
])
def test_bad_fields_are_named_with_a_reason(fields: str, field: str, reason: str) -> None:
    found = errors(f'[[receive_connector]]\nName = "R"\nBindings = ["0.0.0.0:25"]\n{fields}\n')
    assert any(f"org.toml: receive_connector \"R\": {field}: " in e and reason in e
               for e in found), found


def test_connectors_on_one_binding_need_nested_ranges() -> None:
    two = ('[[receive_connector]]\nName = "A"\nBindings = ["0.0.0.0:25"]\n'
           'RemoteIPRanges = ["10.0.0.0/24"]\n'
           '[[receive_connector]]\nName = "B"\nBindings = ["0.0.0.0:25"]\n'
           'RemoteIPRanges = ["{}"]\n')
    assert load(two.replace("{}", "10.0.0.7"))  # inside: allowed
    assert load(two.replace("{}", "10.0.1.0/24"))  # disjoint: allowed
    partial = errors(two.replace("{}", "10.0.0.128-10.0.1.5"))
    assert any('receive_connector "B": RemoteIPRanges' in e and "partly overlaps" in e
               for e in partial), partial
    same = errors(two.replace("{}", "10.0.0.0/24"))
    assert any("both list the range" in e for e in same), same
    other_port = two.replace("{}", "10.0.0.0/24").replace('"0.0.0.0:25"', '"0.0.0.0:2525"', 1)
    assert load(other_port)  # the same ranges on different bindings never conflict


def test_unknown_server_is_refused() -> None:
    found = errors('[[receive_connector]]\nName = "R"\nServer = "HUB09"\n'
                   'Bindings = ["0.0.0.0:25"]\n')
    assert any("Server" in e and "HUB09" in e for e in found)


def test_ranges_parse_and_rank() -> None:
    single, block, span = (parse_range(t) for t in ("192.168.1.75", "192.168.1.0/24",
                                                    "0.0.0.0-255.255.255.255"))
    client = ipaddress.ip_address("192.168.1.75")
    assert all(r.contains(client) for r in (single, block, span))
    assert single.size < block.size < span.size
    assert block.covers(single) and not single.covers(block)
    v6 = parse_range("2001:db8::/32")
    assert v6.contains(ipaddress.ip_address("2001:db8::1"))
    assert not v6.contains(client)


def test_permission_groups_grant_the_exchange_rights() -> None:
    anonymous = rights_for(Principal.ANONYMOUS, frozenset({"AnonymousUsers"}))
    assert Right.SUBMIT in anonymous and Right.ACCEPT_ANY_RECIPIENT not in anonymous
    users = rights_for(Principal.AUTHENTICATED_USER, frozenset({"ExchangeUsers"}))
    assert Right.ACCEPT_ANY_RECIPIENT in users and Right.ACCEPT_ANY_SENDER not in users
    secured = rights_for(Principal.EXTERNALLY_SECURED, frozenset({"ExchangeServers"}))
    assert Right.ACCEPT_ANY_RECIPIENT in secured
    assert Right.ACCEPT_HEADERS_ORGANIZATION not in secured
    servers = rights_for(Principal.EXCHANGE_SERVER, frozenset({"ExchangeServers"}))
    assert Right.ACCEPT_HEADERS_ORGANIZATION in servers
    assert rights_for(Principal.ANONYMOUS, frozenset({"ExchangeUsers"})) == frozenset()
    granted = rights_for(Principal.ANONYMOUS, frozenset({"AnonymousUsers"}),
                         {Principal.ANONYMOUS: frozenset({Right.ACCEPT_ANY_RECIPIENT})})
    assert Right.ACCEPT_ANY_RECIPIENT in granted


def test_anonymous_relay_permission_entry() -> None:
    c = connector('[[receive_connector]]\nName = "Relay"\nBindings = ["0.0.0.0:25"]\n'
                  'PermissionGroups = ["AnonymousUsers"]\n'
                  'Permissions = [{ User = "NT AUTHORITY\\\\ANONYMOUS LOGON", '
                  'ExtendedRights = ["ms-Exch-SMTP-Accept-Any-Recipient"] }]\n')
    assert c.permissions == {Principal.ANONYMOUS: frozenset({Right.ACCEPT_ANY_RECIPIENT})}


def test_embedded_default_has_the_two_default_connectors() -> None:
    from hubport.core.config import load_organization
    from hubport.core.hooks import Hooks

    org = load_organization(None, Hooks().registry.connector_types)
    names = {c.name for c in org.connectors_of("receive_connector")}
    assert names == {"Default HUB01", "Client HUB01"}


def test_exchange_legacy_servers_is_dead_configuration_and_a_warning_says_so() -> None:
    org = load('[[receive_connector]]\nName = "Legacy"\nBindings = ["0.0.0.0:2526"]\n'
               'PermissionGroups = ["ExchangeLegacyServers", "AnonymousUsers"]\n')
    (warning,) = [w for w in org.config_warnings if "ExchangeLegacyServers" in w]
    assert "Legacy" in warning and "rights are unused" in warning
    plain = load('[[receive_connector]]\nName = "Plain"\nBindings = ["0.0.0.0:2526"]\n')
    assert not [w for w in plain.config_warnings if "ExchangeLegacyServers" in w]


def test_a_hub_other_hubs_cannot_relay_to_is_a_warning() -> None:
    two = '[[transport_server]]\nName = "HUB02"\nStateDirectory = "var2"\n'
    org = load(two + '[[receive_connector]]\nName = "Open"\nBindings = ["0.0.0.0:2526"]\n'
               'PermissionGroups = ["AnonymousUsers", "ExchangeServers"]\n'
               'AuthMechanism = ["Tls"]\n')
    (warning,) = [w for w in org.config_warnings if "other hubs cannot relay" in w]
    assert warning.startswith("no receive connector of HUB01, HUB02 has"), warning
    fine = load(two + "".join(
        f'[[receive_connector]]\nName = "Hubs {s}"\nServer = "{s}"\nBindings = ["0.0.0.0:2526"]\n'
        'PermissionGroups = ["ExchangeServers"]\nAuthMechanism = ["Tls", "ExchangeServer"]\n'
        for s in ("HUB01", "HUB02")))
    assert not [w for w in fine.config_warnings if "other hubs cannot relay" in w]
