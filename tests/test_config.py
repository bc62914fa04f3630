"""The organization file: field syntax, validation messages and the embedded default."""

from __future__ import annotations

import pickle
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hubport.core.config import (
    AcceptedDomain,
    Organization,
    load_organization,
    parse_organization,
)
from hubport.core.config_fields import (
    EMBEDDED_SOURCE,
    ConfigContext,
    ConfigError,
    ConfigErrors,
    FieldReader,
    check_name,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)
from hubport.core.connectors import Connector

# ---------------------------------------------------------------------------------------------
# a stand-in for plugins/foreign.py (written elsewhere)


@dataclass
class FakeForeign(Connector):
    section = "foreign_connector"
    kind = "ForeignConnector"
    delivery_type = "NonSmtpGatewayDelivery"

    @classmethod
    def from_config(cls, reader: FieldReader, ctx: ConfigContext) -> Connector:
        common = cls.read_common(reader, ctx)
        extra = {
            "drop_directory": reader.string("DropDirectory", common["name"]),
            "drop_directory_quota": reader.size("DropDirectoryQuota", None),
            "create_drop_directory": reader.bool("CreateDropDirectory", False),
            "relay_dsn_required": reader.bool("RelayDsnRequired", False),
        }
        return cls(**common, extra=extra)


@dataclass
class FakeSend(Connector):
    """A second connector type, to check that names are unique across types."""

    section = "send_connector"
    kind = "SendConnector"

    @classmethod
    def from_config(cls, reader: FieldReader, ctx: ConfigContext) -> Connector:
        common = cls.read_common(reader, ctx)
        if reader.bool("Explode", False):
            raise ConfigError("", reader.object, "Explode", "this type refuses to load")
        return cls(**common)


TYPES: dict[str, type] = {"foreign_connector": FakeForeign, "send_connector": FakeSend}

BASE = """
[[accepted_domain]]
Name = "contoso"
DomainName = "contoso.test"
Default = true
"""


def write(tmp_path: Path, text: str, name: str = "org.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, *, base: bool = True) -> Organization:
    return load_organization(write(tmp_path, (BASE if base else "") + textwrap.dedent(text)),
                             TYPES)


def errors(tmp_path: Path, text: str, *, base: bool = True) -> list[ConfigError]:
    with pytest.raises(ConfigErrors) as info:
        load(tmp_path, text, base=base)
    return list(info.value.errors)


def only_error(tmp_path: Path, text: str, *, base: bool = True) -> ConfigError:
    found = errors(tmp_path, text, base=base)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


# ---------------------------------------------------------------------------------------------
# the embedded default


def test_embedded_default_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    from hubport.plugins.smtp_receive import ReceiveConnector

    org = load_organization(None, {"foreign_connector": FakeForeign,
                                   "receive_connector": ReceiveConnector})
    assert org.source == EMBEDDED_SOURCE
    assert org.base_dir == tmp_path
    hub = org.server("hub01")
    assert hub.name == "HUB01" and hub.site == "Default-First-Site-Name"
    assert hub.fqdn == "hub01.contoso.test"
    assert hub.pickup_directory_path == tmp_path / "pickup"
    assert hub.replay_directory_path == tmp_path / "replay"
    assert hub.root_drop_directory_path == tmp_path / "drop"
    assert hub.message_tracking_log_path == tmp_path / "var" / "logs" / "MessageTracking"
    # Exchange defaults, not compressed test timers
    assert hub.message_expiration_timeout == 2 * 86400
    assert hub.delay_notification_timeout == 4 * 3600
    assert hub.transient_failure_retry_interval == 300
    assert hub.folder_rescan_interval == 5

    assert org.default_domain.domain_name == "contoso.test"
    assert org.postmaster == "postmaster@contoso.test"
    fabrikam = org.accepted_domain_for("FABRIKAM.test")
    assert fabrikam is not None and fabrikam.domain_type == "InternalRelay"
    assert fabrikam.address_book_enabled is False

    alice = org.recipient_for_address("alice.smith@contoso.test")
    assert alice is not None and alice.name == "Alice"
    assert alice.email_addresses[0] == f"SMTP:{alice.primary_smtp_address}"
    assert [m.name for m in org.mailboxes] == ["Administrator", "Alice", "Bob"]
    (staff,) = org.distribution_groups
    assert len(staff.members) == 3
    (fax,) = org.mail_contacts
    assert fax.external_email_address == "FAX:+15551234"
    assert fax.external_type == "FAX"

    (gateway,) = org.connectors_of("foreign_connector")
    assert gateway.name == "Fax Gateway"
    assert str(gateway.address_spaces[0]) == "FAX:*;1"
    assert gateway.source_transport_servers == ("HUB01",)
    assert gateway.extra["create_drop_directory"] is True
    assert gateway.extra["drop_directory"] == "Fax Gateway"


def test_embedded_default_needs_the_foreign_type() -> None:
    with pytest.raises(ConfigErrors) as info:
        load_organization(None, {})
    unknown = {e.object for e in info.value.errors if "unknown section" in e.reason}
    assert {e.file for e in info.value.errors} == {EMBEDDED_SOURCE}
    assert unknown == {"foreign_connector", "receive_connector"}


def test_organization_is_frozen(tmp_path: Path) -> None:
    org = load(tmp_path, "")
    with pytest.raises(AttributeError):
        org.servers = ()  # type: ignore[misc]
    assert isinstance(org.mailboxes, tuple)


# ---------------------------------------------------------------------------------------------
# implicit objects


def test_implicit_site_and_server(tmp_path: Path) -> None:
    org = load(tmp_path, "")
    assert [s.name for s in org.sites] == ["Default-First-Site-Name"]
    hub = org.server("HUB01")
    assert hub.site == "Default-First-Site-Name"
    assert hub.state_directory == tmp_path / "var"
    assert hub.pickup_directory_max_messages_per_minute == 100
    assert hub.poison_threshold == 2
    with pytest.raises(KeyError):
        org.server("HUB02")


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    monkeypatch.chdir(tmp_path)  # not the config folder
    path = write(conf, BASE + """
        [[transport_server]]
        Name = "HUB01"
        StateDirectory = "state"
        PickupDirectoryPath = "../incoming"
        ReplayDirectoryPath = "/abs/replay"
        """)
    hub = load_organization(Path("etc/org.toml"), TYPES).server("HUB01")
    assert hub.state_directory == conf / "state"
    assert hub.pickup_directory_path == tmp_path / "incoming"
    assert hub.replay_directory_path == Path("/abs/replay")
    assert hub.message_tracking_log_path == conf / "state" / "logs" / "MessageTracking"
    assert path.exists()


def test_empty_path_disables_pickup_and_replay(tmp_path: Path) -> None:
    hub = load(tmp_path, """
        [[transport_server]]
        Name = "HUB01"
        PickupDirectoryPath = ""
        ReplayDirectoryPath = ""
        """).server("HUB01")
    assert hub.pickup_directory_path is None
    assert hub.replay_directory_path is None


def test_empty_state_directory_is_refused(tmp_path: Path) -> None:
    error = only_error(tmp_path, """
        [[transport_server]]
        Name = "HUB01"
        StateDirectory = ""
        """)
    assert (error.object, error.field) == ('transport_server "HUB01"', "StateDirectory")
    assert "empty" in error.reason


def test_pickup_and_replay_must_differ(tmp_path: Path) -> None:
    error = only_error(tmp_path, """
        [[transport_server]]
        Name = "HUB01"
        PickupDirectoryPath = "in"
        ReplayDirectoryPath = "./in"
        """)
    assert error.field == "ReplayDirectoryPath"
    assert "PickupDirectoryPath" in error.reason


# ---------------------------------------------------------------------------------------------
# field types: good values


@pytest.mark.parametrize(
    ("key", "value", "attribute", "expected"),
    [
        ("PickupDirectoryMaxHeaderSize", '"64KB"', "pickup_directory_max_header_size", 65536),
        ("PickupDirectoryMaxHeaderSize", "40000", "pickup_directory_max_header_size", 40000),
        ("PickupDirectoryMaxHeaderSize", '"1 MB (1,048,576 bytes)"',
         "pickup_directory_max_header_size", 1048576),
        ("MessageTrackingLogMaxDirectorySize", '"unlimited"',
         "message_tracking_log_max_directory_size", None),
        ("MessageTrackingLogMaxDirectorySize", '"1.5GB"',
         "message_tracking_log_max_directory_size", 1610612736),
        ("PickupDirectoryMaxRecipientsPerMessage", "10000",
         "pickup_directory_max_recipients_per_message", 10000),
        ("PickupDirectoryMaxMessagesPerMinute", '"unlimited"',
         "pickup_directory_max_messages_per_minute", None),
        ("PickupDirectoryMaxMessagesPerMinute", "0",
         "pickup_directory_max_messages_per_minute", None),
        ("PickupDirectoryMaxMessagesPerMinute", "20000",
         "pickup_directory_max_messages_per_minute", 20000),
        ("MessageExpirationTimeout", '"1.12:00:00"', "message_expiration_timeout", 129600.0),
        ("MessageExpirationTimeout", '"00:00:05"', "message_expiration_timeout", 5.0),
        ("MessageExpirationTimeout", '"90d"', "message_expiration_timeout", 90 * 86400.0),
        ("MessageExpirationTimeout", "3600", "message_expiration_timeout", 3600.0),
        ("FolderRescanInterval", '"0.1s"', "folder_rescan_interval", 0.1),
        ("FolderRescanInterval", '"00:00:00.250"', "folder_rescan_interval", 0.25),
        ("FolderSettleTime", "0", "folder_settle_time", 0.0),
        ("MessageTrackingLogMaxAge", '"00:00:00"', "message_tracking_log_max_age", None),
        ("PoisonMessageDetectionEnabled", "false", "poison_message_detection_enabled", False),
        ("PoisonMessageDetectionEnabled", '"$false"', "poison_message_detection_enabled", False),
        ("ExternalDnsServers", '["192.0.2.1", "192.0.2.2:5353", "2001:db8::1", "[::1]:53"]',
         "external_dns_servers",
         (("192.0.2.1", 53), ("192.0.2.2", 5353), ("2001:db8::1", 53), ("::1", 53))),
        ("MaxOutboundConnections", '"unlimited"', "max_outbound_connections", None),
        ("Fqdn", '"Mail.Contoso.Test."', "fqdn", "mail.contoso.test"),
    ],
)
def test_server_field_good_values(
    tmp_path: Path, key: str, value: str, attribute: str, expected: Any
) -> None:
    org = load(tmp_path, f"""
        [[transport_server]]
        Name = "HUB01"
        {key} = {value}
        """)
    assert getattr(org.server("HUB01"), attribute) == expected


# ---------------------------------------------------------------------------------------------
# field types: bad values (each names file, object, field and reason)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("PickupDirectoryMaxHeaderSize", '"16KB"', "between 32KB and"),
        ("PickupDirectoryMaxHeaderSize", '"unlimited"', "cannot be unlimited"),
        ("PickupDirectoryMaxHeaderSize", '"ten megabytes"', "not a size"),
        ("PickupDirectoryMaxHeaderSize", '"1,5MB"', "not a size"),
        ("PickupDirectoryMaxHeaderSize", "-1", "negative"),
        ("PickupDirectoryMaxRecipientsPerMessage", "0", "between 1 and 10000"),
        ("PickupDirectoryMaxRecipientsPerMessage", "10001", "between 1 and 10000"),
        ("PickupDirectoryMaxRecipientsPerMessage", "true", "expected an integer"),
        ("PickupDirectoryMaxRecipientsPerMessage", "1.5", "expected an integer"),
        ("PickupDirectoryMaxMessagesPerMinute", "20001", "between 0 and 20000"),
        ("MessageExpirationTimeout", '"00:00:04"', "between 5s and 90d"),
        ("MessageExpirationTimeout", '"91d"', "between 5s and 90d"),
        ("MessageExpirationTimeout", '"2 days"', "not a duration"),
        ("MessageExpirationTimeout", '"25:00:00"', "hours must be < 24"),
        ("MessageExpirationTimeout", '"30"', "ambiguous"),
        ("MessageExpirationTimeout", "-5", "non-negative"),
        ("FolderRescanInterval", '"50ms"', "between 0.1s and 1h"),
        ("PoisonThreshold", "11", "between 1 and 10"),
        ("PoisonMessageDetectionEnabled", '"yes"', "expected true or false"),
        ("StateDirectory", "5", "expected a path string"),
        ("ExternalDnsServers", '["dns.example"]', "not an IP address"),
        ("ExternalDnsServers", '["192.0.2.1:99999"]', "invalid port"),
        ("Site", '"Paris"', 'no site named "Paris"'),
        ("Fqdn", '"bad_host.contoso.test"', "invalid character"),
        ("MessageTrackingLogMaxFileSize", '"2GB"',
         "must not exceed MessageTrackingLogMaxDirectorySize"),
    ],
)
def test_server_field_bad_values(tmp_path: Path, key: str, value: str, reason: str) -> None:
    extra = 'MessageTrackingLogMaxDirectorySize = "1GB"' if "FileSize" in key else ""
    error = only_error(tmp_path, f"""
        [[transport_server]]
        Name = "HUB01"
        {key} = {value}
        {extra}
        """)
    assert error.file == str(tmp_path / "org.toml")
    assert error.object == 'transport_server "HUB01"'
    assert error.field == key
    assert reason in error.reason
    assert str(error) == f"{error.file}: {error.object}: {key}: {error.reason}"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "must not be empty"),
        ("x" * 65, "longer than 64"),
        ("a/b", "must not contain /"),
        ("a\\\\b", "must not contain /"),
        (".", "must not be . or .."),
        ("..", "must not be . or .."),
        (" HUB", "start or end with a space"),
        ("HUB\\t1", "control character"),
    ],
)
def test_bad_object_names(tmp_path: Path, name: str, reason: str) -> None:
    error = only_error(tmp_path, f"""
        [[site]]
        Name = "{name}"
        [[site]]
        Name = "Good"
        [[transport_server]]
        Name = "HUB01"
        Site = "Good"
        """)
    assert error.field == "Name"
    assert reason in error.reason


def test_missing_name_is_required(tmp_path: Path) -> None:
    error = only_error(tmp_path, """
        [[mailbox]]
        Alias = "nobody"
        """)
    assert (error.object, error.field, error.reason) == ("mailbox #1", "Name", "required")


def test_check_name_accepts_exchange_names() -> None:
    assert check_name("Default-First-Site-Name") is None
    assert check_name("Fax Gateway (Paris) #2") is None
    assert check_name("x" * 64) is None


def test_bad_types_in_other_sections(tmp_path: Path) -> None:
    found = errors(tmp_path, """
        [transport_config]
        MaxSendSize = "10 parsecs"
        ExternalPostmasterAddress = "not an address"
        GenerateCopyOfDSNFor = ["5.4.8", "bounce"]
        OrganizationName = ""
        [[site_link]]
        Name = "L"
        Sites = ["Default-First-Site-Name"]
        Cost = 0
        """)
    by_field = {e.field: e for e in found}
    assert set(by_field) == {"MaxSendSize", "ExternalPostmasterAddress",
                             "GenerateCopyOfDSNFor", "OrganizationName", "Sites", "Cost"}
    assert by_field["MaxSendSize"].object == "transport_config"
    assert by_field["Cost"].object == 'site_link "L"'
    assert "between 1 and 100" in by_field["Cost"].reason
    assert '"bounce"' in by_field["GenerateCopyOfDSNFor"].reason


def test_transport_config_values(tmp_path: Path) -> None:
    org = load(tmp_path, """
        [transport_config]
        MaxSendSize = "25MB"
        MaxReceiveSize = "unlimited"
        MaxRecipientEnvelopeLimit = "unlimited"
        ExternalDelayDsnEnabled = false
        ExternalPostmasterAddress = "<Mailer-Daemon@Contoso.TEST>"
        GenerateCopyOfDSNFor = ["5.1.1"]
        """)
    config = org.transport_config
    assert config.max_send_size == 25 * 1024 * 1024
    assert config.max_receive_size is None
    assert config.max_recipient_envelope_limit is None
    assert config.external_delay_dsn_enabled is False
    assert config.internal_delay_dsn_enabled is True
    assert config.generate_copy_of_dsn_for == ("5.1.1",)
    assert org.postmaster == "Mailer-Daemon@contoso.test"


def test_transport_config_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, "").transport_config
    assert config.max_send_size == config.max_receive_size == 10 * 1024 * 1024
    assert config.max_recipient_envelope_limit == 5000
    assert config.generate_copy_of_dsn_for == ("5.4.8", "5.4.6", "5.4.4", "5.2.4", "5.2.0",
                                               "5.1.4")
    assert config.organization_name == "First Organization"


# ---------------------------------------------------------------------------------------------
# many errors at once, unknown fields and sections, syntax errors


def test_several_errors_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors) as info:
        load(tmp_path, """
            [[transport_server]]
            Name = "HUB01"
            PoisonThreshold = 0
            MessageRetryInterval = "soon"
            [[mailbox]]
            Name = "Alice"
            Server = "HUB09"
            [[foreign_connector]]
            Name = "Fax"
            AddressSpaces = []
            """)
    found = info.value.errors
    assert {(e.object, e.field) for e in found} == {
        ('transport_server "HUB01"', "PoisonThreshold"),
        ('transport_server "HUB01"', "MessageRetryInterval"),
        ('mailbox "Alice"', "Server"),
        ('foreign_connector "Fax"', "AddressSpaces"),
    }
    lines = str(info.value).splitlines()
    assert len(lines) == 4
    assert all(line.startswith(str(tmp_path / "org.toml") + ": ") for line in lines)


def test_unknown_field_suggests_the_right_one(tmp_path: Path) -> None:
    error = only_error(tmp_path, """
        [[transport_server]]
        Name = "HUB01"
        PickupDirectroyPath = "in"
        """)
    assert error.object == 'transport_server "HUB01"'
    assert error.field == "PickupDirectroyPath"
    assert error.reason == 'unknown field; did you mean "PickupDirectoryPath"?'


def test_unknown_field_in_a_connector_section(tmp_path: Path) -> None:
    error = only_error(tmp_path, """
        [[foreign_connector]]
        Name = "Fax"
        AddressSpaces = ["FAX:*"]
        DropDirectoryQuotta = "1GB"
        """)
    assert error.object == 'foreign_connector "Fax"'
    assert 'did you mean "DropDirectoryQuota"?' in error.reason


def test_keys_are_case_insensitive(tmp_path: Path) -> None:
    org = load(tmp_path, """
        [[transport_server]]
        name = "HUB01"
        POISONTHRESHOLD = 5
        """)
    assert org.server("HUB01").poison_threshold == 5
    error = only_error(tmp_path, """
        [[transport_server]]
        Name = "HUB01"
        poisonthreshold = 50
        """)
    assert error.field == "PoisonThreshold"  # the canonical spelling


def test_same_key_twice_in_different_case(tmp_path: Path) -> None:
    error = only_error(tmp_path, """
        [[transport_server]]
        Name = "HUB01"
        PoisonThreshold = 3
        poisonthreshold = 4
        """)
    assert "duplicate field" in error.reason


def test_unknown_section_suggests_the_right_one(tmp_path: Path) -> None:
    error = only_error(tmp_path, """
        [[mailboxes]]
        Name = "Alice"
        """)
    assert error.object == "mailboxes"
    assert error.reason == 'unknown section; did you mean "mailbox"?'
    error = only_error(tmp_path, """
        [[zzz]]
        Name = "x"
        """)
    assert "known sections:" in error.reason and "foreign_connector" in error.reason


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        [[accepted_domain]]
        Name = "contoso"
        DomainName = contoso.test
        """)
    with pytest.raises(ConfigError) as info:
        load_organization(path, TYPES)
    (error,) = info.value.errors  # type: ignore[attr-defined]
    assert error.file == str(path)
    assert error.line == 3
    assert error.object.startswith("line 3, column ")
    assert "TOML syntax error" in error.reason
    assert str(path) in str(info.value) and "line 3" in str(info.value)


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors) as info:
        load_organization(tmp_path / "missing.toml", TYPES)
    assert "cannot read" in str(info.value)
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[transport_config]\nOrganizationName = "Soci\xe9t\xe9"\n')
    with pytest.raises(ConfigErrors) as info:
        load_organization(path, TYPES)
    assert info.value.errors[0].line == 2


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + textwrap.dedent(BASE).encode())
    assert load_organization(path, TYPES).default_domain.domain_name == "contoso.test"


def test_section_of_the_wrong_shape(tmp_path: Path) -> None:
    error = only_error(tmp_path, 'mailbox = "Alice"\n' + BASE, base=False)
    assert error.object == "mailbox" and "[[mailbox]]" in error.reason


# ---------------------------------------------------------------------------------------------
# accepted domains


def test_no_default_accepted_domain(tmp_path: Path) -> None:
    error = only_error(tmp_path, """
        [[accepted_domain]]
        Name = "a"
        DomainName = "a.test"
        [[accepted_domain]]
        Name = "b"
        DomainName = "b.test"
        """, base=False)
    assert (error.object, error.field) == ('accepted_domain "a"', "Default")
    assert "exactly one" in error.reason


def test_two_default_accepted_domains(tmp_path: Path) -> None:
    error = only_error(tmp_path, """
        [[accepted_domain]]
        Name = "other"
        DomainName = "other.test"
        Default = true
        """)
    assert (error.object, error.field) == ('accepted_domain "other"', "Default")
    assert 'accepted_domain "contoso"' in error.reason


def test_no_accepted_domain_at_all(tmp_path: Path) -> None:
    error = only_error(tmp_path, "", base=False)
    assert error.object == "accepted_domain"


def test_wildcard_cannot_be_default_and_duplicates_are_refused(tmp_path: Path) -> None:
    found = errors(tmp_path, """
        [[accepted_domain]]
        Name = "wild"
        DomainName = "*.wild.test"
        Default = true
        [[accepted_domain]]
        Name = "again"
        DomainName = "CONTOSO.test"
        [[accepted_domain]]
        Name = "bad"
        DomainName = "*wild.test"
        DomainType = "Relay"
        """)
    reasons = {(e.object, e.field): e.reason for e in found}
    wild = [e.reason for e in found if e.object == 'accepted_domain "wild"']
    assert any("wildcard domain cannot be the default" in r for r in wild)
    assert any('accepted_domain "contoso" is already the default' in r for r in wild)
    assert 'accepted_domain "contoso"' in reasons[('accepted_domain "again"', "DomainName")]
    assert "*.contoso.com" in reasons[('accepted_domain "bad"', "DomainName")]
    assert "Authoritative, InternalRelay, ExternalRelay" in reasons[
        ('accepted_domain "bad"', "DomainType")]


def test_accepted_domain_matching() -> None:
    exact = AcceptedDomain("e", "sub.contoso.test")
    wild = AcceptedDomain("w", "*.contoso.test", "InternalRelay")
    wilder = AcceptedDomain("x", "*.sub.contoso.test")
    assert exact.matches("SUB.contoso.test.") is not None
    assert exact.matches("a.sub.contoso.test") is None
    assert wild.matches("contoso.test") is not None
    assert wild.matches("deep.sub.contoso.test") is not None
    assert wild.matches("notcontoso.test") is None
    # exact beats wildcard; a longer wildcard beats a shorter one
    assert exact.matches("sub.contoso.test") > wilder.matches("sub.contoso.test")  # type: ignore
    assert wilder.matches("a.sub.contoso.test") > wild.matches("a.sub.contoso.test")  # type: ignore


def test_accepted_domain_for_picks_the_most_specific(tmp_path: Path) -> None:
    org = load(tmp_path, """
        [[accepted_domain]]
        Name = "all of fabrikam"
        DomainName = "*.fabrikam.test"
        DomainType = "ExternalRelay"
        [[accepted_domain]]
        Name = "sales"
        DomainName = "sales.fabrikam.test"
        """)
    assert org.accepted_domain_for("sales.fabrikam.test").name == "sales"  # type: ignore
    assert org.accepted_domain_for("it.fabrikam.test").name == "all of fabrikam"  # type: ignore
    assert org.accepted_domain_for("fabrikam.test").name == "all of fabrikam"  # type: ignore
    assert org.accepted_domain_for("example.test") is None
    assert org.accepted_domains[1].address_book_enabled is False  # ExternalRelay default
    assert org.accepted_domains[2].address_book_enabled is True  # Authoritative default


# ---------------------------------------------------------------------------------------------
# recipients


def test_mailbox_addresses(tmp_path: Path) -> None:
    org = load(tmp_path, """
        [[accepted_domain]]
        Name = "fabrikam"
        DomainName = "fabrikam.test"
        [[mailbox]]
        Name = "Carol Smith"
        EmailAddresses = ["carol@fabrikam.test", "SMTP:Carol.Smith@CONTOSO.test", "X400:c=US;a= ;p=Contoso;s=Smith"]
        MaxReceiveSize = "20MB"
        PasswordHash = "$scrypt$abc"
        """)
    (carol,) = org.mailboxes
    assert carol.alias == "CarolSmith"
    assert carol.primary_smtp_address == "Carol.Smith@contoso.test"
    assert carol.email_addresses == (
        "SMTP:Carol.Smith@contoso.test", "smtp:carol@fabrikam.test",
        "X400:c=US;a= ;p=Contoso;s=Smith")
    assert carol.smtp_addresses == ("Carol.Smith@contoso.test", "carol@fabrikam.test")
    assert carol.server == "HUB01"
    assert carol.max_receive_size == 20 * 1024 * 1024
    assert carol.password_hash == "$scrypt$abc"


def test_mailbox_address_errors(tmp_path: Path) -> None:
    found = errors(tmp_path, """
        [[mailbox]]
        Name = "A"
        PrimarySmtpAddress = "a@contoso.test"
        EmailAddresses = ["SMTP:other@contoso.test", "smtp:a@elsewhere.test", "smtp:@@"]
        [[mailbox]]
        Name = "B"
        EmailAddresses = ["SMTP:b1@contoso.test", "SMTP:b2@contoso.test"]
        [[mailbox]]
        Name = "C D!"
        Alias = "c d"
        """)
    reasons = [(e.object, e.field, e.reason) for e in found]
    assert any(o == 'mailbox "A"' and f == "PrimarySmtpAddress" and "SMTP:other" in r
               for o, f, r in reasons)
    assert any(o == 'mailbox "A"' and "elsewhere.test is not an accepted domain" in r
               for o, f, r in reasons)
    assert any(o == 'mailbox "A"' and '"smtp:@@"' in r for o, f, r in reasons)
    assert any(o == 'mailbox "B"' and "more than one primary" in r for o, f, r in reasons)
    assert any(o == 'mailbox "C D!"' and f == "Alias" for o, f, r in reasons)


def test_duplicate_proxy_address_names_both_objects(tmp_path: Path) -> None:
    error = only_error(tmp_path, """
        [[mailbox]]
        Name = "Alice"
        [[distribution_group]]
        Name = "Team"
        EmailAddresses = ["smtp:ALICE@contoso.test"]
        """)
    assert error.object == 'distribution_group "Team"'
    assert error.field == "EmailAddresses"
    assert 'mailbox "Alice"' in error.reason and "ALICE@contoso.test" in error.reason


def test_duplicate_names_and_aliases(tmp_path: Path) -> None:
    found = errors(tmp_path, """
        [[mailbox]]
        Name = "Alice"
        [[mail_contact]]
        Name = "alice"
        Alias = "alice2"
        ExternalEmailAddress = "alice@example.net"
        [[mailbox]]
        Name = "Alice B"
        Alias = "ALICE"
        PrimarySmtpAddress = "aliceb@contoso.test"
        """)
    reasons = {(e.object, e.field): e.reason for e in found}
    assert 'mailbox "Alice"' in reasons[('mail_contact "alice"', "Name")]
    assert 'mailbox "Alice"' in reasons[('mailbox "Alice B"', "Alias")]


def test_same_name_twice_is_reported(tmp_path: Path) -> None:
    found = errors(tmp_path, """
        [[mailbox]]
        Name = "Bob"
        [[mailbox]]
        Name = "Bob"
        PrimarySmtpAddress = "bob2@contoso.test"
        Alias = "bob2"
        """)
    assert [(e.object, e.field) for e in found] == [('mailbox "Bob"', "Name")]
    assert "declared earlier" in found[0].reason


def test_mail_contact(tmp_path: Path) -> None:
    org = load(tmp_path, """
        [[mail_contact]]
        Name = "Partner"
        ExternalEmailAddress = "Someone@Example.NET"
        PrimarySmtpAddress = "someone@example.net"
        [[mail_contact]]
        Name = "Fax"
        ExternalEmailAddress = "FAX:+15551234"
        """)
    partner, fax = org.mail_contacts
    assert partner.external_email_address == "SMTP:Someone@example.net"
    assert partner.primary_smtp_address == "someone@example.net"  # the external one is allowed
    assert fax.external_email_address == "FAX:+15551234"
    assert fax.primary_smtp_address == "Fax@contoso.test"
    error = only_error(tmp_path, """
        [[mail_contact]]
        Name = "Nobody"
        """)
    assert (error.field, error.reason) == ("ExternalEmailAddress", "required")


def test_mailbox_server_must_exist(tmp_path: Path) -> None:
    error = only_error(tmp_path, """
        [[transport_server]]
        Name = "HUB01"
        [[transport_server]]
        Name = "HUB02"
        [[mailbox]]
        Name = "Alice"
        Server = "HUB2"
        """)
    assert error.field == "Server"
    assert 'did you mean "HUB02"?' in error.reason
    org = load(tmp_path, """
        [[transport_server]]
        Name = "HUB01"
        [[transport_server]]
        Name = "HUB02"
        [[mailbox]]
        Name = "Alice"
        Server = "hub02"
        """)
    assert org.mailboxes[0].server == "HUB02"


# ---------------------------------------------------------------------------------------------
# groups


def test_group_members_resolve_by_name_alias_and_address(tmp_path: Path) -> None:
    org = load(tmp_path, """
        [[mailbox]]
        Name = "Alice Smith"
        Alias = "asmith"
        EmailAddresses = ["smtp:alice@contoso.test"]
        [[mailbox]]
        Name = "Bob"
        [[mail_contact]]
        Name = "Partner"
        ExternalEmailAddress = "p@example.net"
        [[distribution_group]]
        Name = "Inner"
        Members = ["bob"]
        [[distribution_group]]
        Name = "Outer"
        Members = ["ALICE SMITH", "asmith", "Alice@Contoso.Test", "Partner", "inner"]
        """)
    inner, outer = org.distribution_groups
    assert inner.members == ("Bob@contoso.test",)
    assert outer.members == ("asmith@contoso.test", "Partner@contoso.test", "Inner@contoso.test")


def test_group_member_errors(tmp_path: Path) -> None:
    found = errors(tmp_path, """
        [[mailbox]]
        Name = "Bob"
        [[distribution_group]]
        Name = "Team"
        Members = ["Bob", "Carol", "ghost@contoso.test", "Team"]
        """)
    reasons = [(e.object, e.field, e.reason) for e in found]
    assert len(reasons) == 3
    assert all(o == 'distribution_group "Team"' and f == "Members" for o, f, _r in reasons)
    assert '"Carol"' in reasons[0][2]
    assert '"ghost@contoso.test"' in reasons[1][2]
    assert "itself" in reasons[2][2]


def test_nested_group_loops_are_allowed(tmp_path: Path) -> None:
    org = load(tmp_path, """
        [[distribution_group]]
        Name = "A"
        Members = ["B"]
        [[distribution_group]]
        Name = "B"
        Members = ["A"]
        """)
    assert [g.members for g in org.distribution_groups] == [("B@contoso.test",),
                                                            ("A@contoso.test",)]


# ---------------------------------------------------------------------------------------------
# sites, servers, connectors


SITES = """
[[site]]
Name = "Paris"
[[site]]
Name = "London"
[[site]]
Name = "Madrid"
[[site]]
Name = "Oslo"
[[site]]
Name = "Tokyo"
[[site]]
Name = "Kyoto"
[[site_link]]
Name = "Tokyo-Kyoto"
Sites = ["Tokyo", "Kyoto"]
[[site_link]]
Name = "Paris-London"
Sites = ["Paris", "London"]
Cost = 10
[[site_link]]
Name = "London-Madrid"
Sites = ["london", "Madrid"]
Cost = 10
[[site_link]]
Name = "Paris-Madrid"
Sites = ["Paris", "Madrid"]
Cost = 50
ExchangeCost = 30
[[site_link]]
Name = "Madrid-Oslo"
Sites = ["Madrid", "Oslo"]
[[transport_server]]
Name = "HUB01"
Site = "paris"
"""


def test_site_cost(tmp_path: Path) -> None:
    org = load(tmp_path, SITES)
    assert org.server("HUB01").site == "Paris"
    assert org.site_cost("Paris", "Paris") == 0
    assert org.site_cost("Paris", "London") == 10
    assert org.site_cost("Paris", "Madrid") == 20  # via London beats ExchangeCost 30
    assert org.site_cost("oslo", "PARIS") == 120  # default cost 100
    assert org.site_cost("Paris", "Tokyo") is None  # no chain of links (and no server there)
    assert org.site_cost("Paris", "Atlantis") is None
    link = next(x for x in org.site_links if x.name == "Paris-Madrid")
    assert link.cost == 30


def test_exchange_cost_overrides_cost(tmp_path: Path) -> None:
    org = load(tmp_path, SITES.replace("ExchangeCost = 30", "ExchangeCost = 5"))
    assert org.site_cost("Paris", "Madrid") == 5


def test_site_link_errors(tmp_path: Path) -> None:
    found = errors(tmp_path, SITES + """
        [[site_link]]
        Name = "Paris-Nowhere"
        Sites = ["Paris", "Nowhere"]
        [[site_link]]
        Name = "Lonely"
        Sites = ["Paris", "PARIS"]
        [[site_link]]
        Name = "paris-london"
        Sites = ["Paris", "London"]
        """)
    reasons = {(e.object, e.field): e.reason for e in found}
    assert 'no site named "Nowhere"' in reasons[('site_link "Paris-Nowhere"', "Sites")]
    assert "two different sites" in reasons[('site_link "Lonely"', "Sites")]
    assert 'site_link "Paris-London"' in reasons[('site_link "paris-london"', "Name")]


def test_duplicate_server_names(tmp_path: Path) -> None:
    error = only_error(tmp_path, """
        [[transport_server]]
        Name = "HUB01"
        [[transport_server]]
        Name = "hub01"
        """)
    assert error.object == 'transport_server "hub01"'
    assert 'transport_server "HUB01"' in error.reason


def test_fqdn_derived_from_a_name_that_is_no_host_name(tmp_path: Path) -> None:
    error = only_error(tmp_path, """
        [[transport_server]]
        Name = "Hub One"
        """)
    assert error.field == "Fqdn" and "set Fqdn" in error.reason


def test_connector_source_servers_and_scoping(tmp_path: Path) -> None:
    org = load(tmp_path, """
        [[transport_server]]
        Name = "HUB01"
        [[transport_server]]
        Name = "HUB02"
        [[foreign_connector]]
        Name = "Fax"
        AddressSpaces = ["FAX:*;5"]
        [[foreign_connector]]
        Name = "Telex"
        AddressSpaces = ["TELEX:*"]
        SourceTransportServers = ["hub02", "HUB01", "HUB02"]
        IsScopedConnector = true
        MaxMessageSize = "5MB"
        DropDirectoryQuota = "100MB"
        """)
    fax, telex = org.connectors_of("foreign_connector")
    assert fax.source_transport_servers == ("HUB01",)  # the first server
    assert telex.source_transport_servers == ("HUB02", "HUB01")
    assert telex.is_scoped_connector and telex.max_message_size == 5 * 1024 * 1024
    assert telex.extra["drop_directory"] == "Telex"
    assert telex.extra["drop_directory_quota"] == 100 * 1024 * 1024
    assert org.connector("telex") is telex
    assert org.connectors_of("send_connector") == ()


def test_connector_errors(tmp_path: Path) -> None:
    found = errors(tmp_path, """
        [[foreign_connector]]
        Name = "Gateway"
        AddressSpaces = ["FAX:*", "*contoso.test"]
        SourceTransportServers = ["HUB99"]
        [[send_connector]]
        Name = "gateway"
        AddressSpaces = ["*"]
        [[send_connector]]
        Name = "Boom"
        AddressSpaces = ["*"]
        Explode = true
        [[send_connector]]
        Name = "Fine"
        AddressSpaces = ["contoso.test"]
        """)
    reasons = {(e.object, e.field): e.reason for e in found}
    assert set(reasons) == {
        ('foreign_connector "Gateway"', "AddressSpaces"),
        ('foreign_connector "Gateway"', "SourceTransportServers"),
        ('send_connector "gateway"', "Name"),
        ('send_connector "Boom"', "Explode"),
    }
    assert '"*contoso.test"' in reasons[('foreign_connector "Gateway"', "AddressSpaces")]
    assert "HUB99" in reasons[('foreign_connector "Gateway"', "SourceTransportServers")]
    assert 'foreign_connector "Gateway"' in reasons[('send_connector "gateway"', "Name")]
    boom = next(e for e in found if e.field == "Explode")
    assert boom.file == str(tmp_path / "org.toml")  # filled in by the context


# ---------------------------------------------------------------------------------------------
# value syntax


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("00:00:30", 30), ("01:30", 5400), ("1.00:00:00", 86400), ("2.04:05:06", 187506),
        ("00:00:00.5", 0.5), ("00:00:01.0000001", 1.0000001), ("30s", 30), ("5m", 300),
        ("4h", 14400), ("2d", 172800), ("1w", 604800), ("1h30m", 5400), ("250ms", 0.25),
        ("1.5h", 5400), (" 5 M ", 300), (45, 45), (0.1, 0.1),
    ],
)
def test_parse_duration(text: Any, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "30", "-00:00:05", "00:60:00", "24:00:00", "00:00:60", "5 minutes", "1:2:3:4",
             "00:00:00.12345678", "s", -1, float("nan"), True, [1]],
)
def test_parse_duration_refuses(text: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("10MB", 10485760), ("64KB", 65536), ("1.5GB", 1610612736), ("10 MB (10,485,760 bytes)",
         10485760), ("9.537 MB (10,000,000 bytes)", 10000000), ("1TB", 1 << 40), ("100B", 100),
        ("100", 100), ("10,485,760", 10485760), ("10mb", 10485760), (4096, 4096),
        ("unlimited", None), ("Unlimited", None), ("0.5KB", 512),
    ],
)
def test_parse_size(text: Any, size: int | None) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "10 XB", "1,5MB", "10MB (ten bytes)", "-5MB", -1,
                                  1.5, True, "10 MB MB"])
def test_parse_size_refuses(text: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        parse_size(text)


def test_formatting() -> None:
    assert format_duration(172800) == "2d"
    assert format_duration(90) == "90s"
    assert format_duration(0.1) == "0.1s"
    assert format_size(65536) == "64KB"
    assert format_size(1000) == "1000B"
    assert format_size(None) == "unlimited"


# ---------------------------------------------------------------------------------------------
# the reader and the errors themselves


def test_reader_directly(tmp_path: Path) -> None:
    ctx = ConfigContext("x.toml", tmp_path, {"HUB01": "S"})
    reader = FieldReader({"Mode": "FAST", "List": ["a", 5], "Path": "sub", "Name": "N"},
                         'thing "N"', ctx)
    assert reader.string("mode", choices=["Fast", "Slow"]) == "Fast"
    assert reader.string_list("List") == ("a",)
    assert reader.path("Path", None) == tmp_path / "sub"
    assert reader.path("Other", None) is None
    assert reader.string("Missing", "dflt") == "dflt"
    reader.finish()  # Name was never read
    assert [str(e) for e in ctx.errors] == [
        'x.toml: thing "N": List: entry 2: expected a string, got an integer (5)',
        'x.toml: thing "N": Name: unknown field',
    ]
    assert ctx.default_source_servers() == ("HUB01",)
    assert ctx.site_of("hub01") == "S"


def test_config_error_formatting_and_pickling() -> None:
    error = ConfigError("f.toml", 'mailbox "A"', None, "bad")
    assert str(error) == 'f.toml: mailbox "A": bad'
    both = ConfigErrors([error, ConfigErrors([ConfigError("f.toml", "", None, "worse")])])
    assert len(both) == 2
    assert str(both) == 'f.toml: mailbox "A": bad\nf.toml: worse'
    assert isinstance(both, ConfigError)
    again = pickle.loads(pickle.dumps(both))
    assert str(again) == str(both)
    assert pickle.loads(pickle.dumps(error)).object == 'mailbox "A"'


def test_parse_organization_from_text(tmp_path: Path) -> None:
    org = parse_organization(BASE, source="edit", base_dir=tmp_path, connector_types={})
    assert org.source == "edit"
    assert org.server("HUB01").pickup_directory_path == tmp_path / "pickup"


def test_a_site_link_limits_the_size_of_what_crosses_it(tmp_path: Path) -> None:
    org = load(tmp_path, SITES.replace('Cost = 10\n[[site_link]]\nName = "London-Madrid"',
                                       'Cost = 10\nMaxMessageSize = "1MB"\n[[site_link]]\n'
                                       'Name = "London-Madrid"'))
    (first, _) = org.site_path("Paris", "Madrid") or []
    assert (first.link, first.max_message_size) == ("Paris-London", 1024 * 1024)


def test_equal_paths_go_by_site_names_from_the_destination_back(tmp_path: Path) -> None:
    """Same cost, same hops: Exchange compares the site just before the destination first
    (Charlie beats Delta), whatever the sites nearer the start (Alpha would beat Bravo)."""
    sites = "".join(f'[[site]]\nName = "{n}"\n' for n in
                    ("Start", "Alpha", "Bravo", "Charlie", "Delta", "End"))
    links = "".join(f'[[site_link]]\nName = "{a}-{b}"\nSites = ["{a}", "{b}"]\nCost = 1\n'
                    for a, b in (("Start", "Alpha"), ("Alpha", "Delta"), ("Delta", "End"),
                                 ("Start", "Bravo"), ("Bravo", "Charlie"), ("Charlie", "End")))
    org = load(tmp_path, sites + links + '[[transport_server]]\nName = "HUB01"\nSite = "Start"\n')
    path = org.site_path("Start", "End")
    assert path is not None and [step.site for step in path] == ["Bravo", "Charlie", "End"]
