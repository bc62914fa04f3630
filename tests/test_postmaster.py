"""Postmaster and abuse@ (RFC 5321 §4.5.1, RFC 2142) on the receive side.

The embedded default organization is run as shipped (only its ports, tarpit and paths
changed), so what a fresh installation answers is what is tested. Every SMTP test talks to a
real daemon over a real loopback socket.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import pytest

from hubport.core.config import parse_organization
from hubport.core.directory import RecipientDirectory
from hubport.plugins.pytest_plugin import Hub, running_daemon
from hubport.plugins.smtp_receive.connector import ReceiveConnector
from smtp_support import body, connected, free_port, receive_connector
from support import read_mail, wait_for_value

pytestmark = pytest.mark.timeout(120)

ANONYMOUS = {"PermissionGroups": ["AnonymousUsers"]}


def default_org_text(default_port: int, client_port: int, extra: str = "") -> str:
    """core/default.toml on free ports, without the tarpit, plus `extra` tables."""
    text = resources.files("hubport.core").joinpath("default.toml").read_text(encoding="utf-8")
    assert text.count('"127.0.0.1:2525"') == 1 and text.count('"127.0.0.1:5587"') == 1
    text = text.replace('"127.0.0.1:2525"', f'"127.0.0.1:{default_port}"')
    text = text.replace('"127.0.0.1:5587"', f'"127.0.0.1:{client_port}"')
    text = re.sub(r'^(Bindings = .*)$', r'\1\nTarpitInterval = "0s"', text, flags=re.M)
    return text + "\n" + extra


@asynccontextmanager
async def running(root: Path, text: str) -> AsyncIterator[Hub]:
    """An in-process daemon on organization `text` (written to root/org.toml)."""
    config = root / "org.toml"
    config.write_text(text, encoding="utf-8")
    async with running_daemon(config) as daemon:
        yield Hub(root, daemon)


async def delivered_subjects(hub: Hub, alias: str, count: int) -> list[str]:
    """Subjects in a mailbox once `count` messages are there (reports what it saw)."""
    return await wait_for_value(
        lambda: sorted(str(read_mail(p)["Subject"]) for p in hub.maildir(alias)),
        lambda seen: len(seen) >= count, f"{count} messages in {alias}")


async def tracked(hub: Hub, event_id: str, count: int) -> list[dict]:
    """The tracking events `event_id` once `count` of them are on disk (flushed in batches)."""
    return await wait_for_value(lambda: hub.events(event_id=event_id),
                                lambda seen: len(seen) >= count, f"{count} {event_id} events")


# -- the embedded default organization ----------------------------------------------------------


POSTMASTER_FORMS = ["<Postmaster>", "<POSTMASTER>", "<postmaster>", "<postmaster@contoso.test>",
                    "<PostMaster@CONTOSO.TEST>", "<abuse@contoso.test>"]


async def test_default_org_accepts_postmaster_and_abuse_anonymously(tmp_path: Path) -> None:
    default_port, client_port = free_port(), free_port()
    async with running(tmp_path, default_org_text(default_port, client_port)) as hub:
        for index, rcpt in enumerate(POSTMASTER_FORMS):
            async with connected(default_port) as client:
                await client.hello("stranger.example")
                assert (await client.cmd("MAIL FROM:<someone@example.org>")).code == 250
                reply = await client.cmd(f"RCPT TO:{rcpt}")
                assert (reply.code, reply.enhanced) == (250, "2.1.5"), (rcpt, reply)
                assert (await client.cmd("DATA")).code == 354
                await client.send(body(f"report {index}") + b"\r\n.\r\n")
                reply = await client.reply()
                assert reply.code == 250, (rcpt, reply)
        subjects = await delivered_subjects(hub, "Administrator", len(POSTMASTER_FORMS))
        assert subjects == sorted(f"report {i}" for i in range(len(POSTMASTER_FORMS)))
        assert hub.maildir("Alice") == [] and hub.maildir("Bob") == []
        # the envelope names the postmaster of the default domain, never the DSN sender
        # setting; the categorizer resolves it to the mailbox holding it
        delivered = await tracked(hub, "DELIVER", len(POSTMASTER_FORMS))
        assert {a for e in delivered for a in e["recipient-address"]} == {
            "Administrator@contoso.test"}


async def test_postmaster_on_a_connector_without_relay_rights_bypasses_only_relay(
        tmp_path: Path) -> None:
    """An anonymous session may not relay, yet <Postmaster> and postmaster@ the name the
    connector greets with are taken; a stranger's domain is still refused."""
    default_port, client_port = free_port(), free_port()
    async with running(tmp_path, default_org_text(default_port, client_port)) as hub, \
            connected(default_port) as client:
        await client.hello()
        assert (await client.cmd("MAIL FROM:<someone@example.org>")).code == 250
        reply = await client.cmd("RCPT TO:<victim@elsewhere.example>")
        assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply
        reply = await client.cmd("RCPT TO:<postmaster@elsewhere.example>")
        assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply
        assert (await client.cmd("RCPT TO:<postmaster@hub01.contoso.test>")).code == 250
        assert (await client.cmd("DATA")).code == 354
        await client.send(body("to the greeting name") + b"\r\n.\r\n")
        assert (await client.reply()).code == 250
        assert await delivered_subjects(hub, "Administrator", 1) == ["to the greeting name"]
        (event,) = await tracked(hub, "RECEIVE", 1)
        assert event["recipient-address"] == ["postmaster@contoso.test"]


async def test_a_session_refused_at_mail_stays_refused(tmp_path: Path) -> None:
    default_port, client_port, users_port = free_port(), free_port(), free_port()
    users_only = receive_connector("Users only", [f"127.0.0.1:{users_port}"],
                                   PermissionGroups=["ExchangeUsers"],
                                   AuthMechanism=["BasicAuth"])
    text = default_org_text(default_port, client_port, users_only)
    async with running(tmp_path, text) as hub:
        async with connected(users_port) as client:
            await client.hello()
            reply = await client.cmd("MAIL FROM:<someone@example.org>")
            assert (reply.code, reply.enhanced) == (530, "5.7.1"), reply
            for rcpt in ("<Postmaster>", "<postmaster@contoso.test>"):
                reply = await client.cmd(f"RCPT TO:{rcpt}")
                assert (reply.code, reply.enhanced) == (503, "5.5.1"), reply
        async with connected(client_port) as client:  # Client HUB01: TLS first
            await client.hello()
            reply = await client.cmd("MAIL FROM:<someone@example.org>")
            assert (reply.code, reply.enhanced) == (530, "5.7.0"), reply
            reply = await client.cmd("RCPT TO:<Postmaster>")
            assert reply.code == 530, reply
        assert await hub.store.read(
            lambda c: c.execute("SELECT COUNT(*) FROM message").fetchone()[0]) == 0


# -- an organization that forgot its postmaster ---------------------------------------------

FORGETFUL = """
[[accepted_domain]]
Name = "northwind.test"
DomainName = "*.northwind.test"
DomainType = "Authoritative"

[[mailbox]]
Name = "Administrator"
PrimarySmtpAddress = "administrator@contoso.test"
"""


async def test_postmaster_of_every_authoritative_domain_reaches_the_administrator(
        hub_factory, tmp_path: Path) -> None:
    """BASE_ORG holds no postmaster@ anywhere: the Administrator mailbox gets it."""
    port = free_port()
    extra = FORGETFUL + receive_connector("Default", [f"127.0.0.1:{port}"], **ANONYMOUS)
    rcpts = ["<Postmaster>", "<postmaster@contoso.test>", "<postmaster@northwind.test>",
             "<postmaster@mail.northwind.test>"]
    async with hub_factory(extra=extra) as hub:
        assert hub.daemon.org.config_warnings == ()
        async with connected(port) as client:
            await client.hello()
            assert (await client.cmd("MAIL FROM:<someone@example.org>")).code == 250
            for rcpt in rcpts:
                reply = await client.cmd(f"RCPT TO:{rcpt}")
                assert reply.code == 250, (rcpt, reply)
            # abuse@ is the organization's to give out; unowned, it is unknown as before
            reply = await client.cmd("RCPT TO:<abuse@contoso.test>")
            assert (reply.code, reply.enhanced) == (550, "5.1.1"), reply
            assert (await client.cmd("DATA")).code == 354
            await client.send(body("one copy") + b"\r\n.\r\n")
            assert (await client.reply()).code == 250
        # four envelope recipients, one mailbox: delivered once
        assert await delivered_subjects(hub, "Administrator", 1) == ["one copy"]
        (resolved,) = await tracked(hub, "DELIVER", 1)
        assert resolved["recipient-address"] == ["administrator@contoso.test"]


BASE = """
[[accepted_domain]]
Name = "contoso.test"
DomainName = "contoso.test"
Default = true

[[accepted_domain]]
Name = "fabrikam.test"
DomainName = "fabrikam.test"
DomainType = "InternalRelay"

[[transport_server]]
Name = "HUB01"
"""


def org(tables: str, transport: str = ""):
    text = (f"[transport_config]\n{transport}\n" if transport else "") + BASE + tables
    return parse_organization(text, source="org.toml", base_dir=Path("/tmp"),
                              connector_types={"receive_connector": ReceiveConnector})


def test_the_postmaster_recipient_is_chosen_in_order() -> None:
    boxes = """
[[mailbox]]
Name = "Administrator"
[[mailbox]]
Name = "Ops"
[[distribution_group]]
Name = "Postmasters"
EmailAddresses = ["smtp:postmaster@contoso.test"]
Members = ["Ops"]
"""
    # the holder of postmaster@<default domain> (here a group) comes first
    assert org(boxes).postmaster_recipient.name == "Postmasters"
    assert org(boxes).recipient_for_address("POSTMASTER@contoso.test").name == "Postmasters"
    # then the holder of ExternalPostmasterAddress, when it is local
    plain = boxes.replace('EmailAddresses = ["smtp:postmaster@contoso.test"]\n', "")
    held = org(plain, 'ExternalPostmasterAddress = "ops@contoso.test"')
    assert held.postmaster_recipient.name == "Ops"
    assert held.postmaster_delivery_address == "postmaster@contoso.test"
    # then the mailbox aliased Administrator
    assert org(plain).postmaster_recipient.name == "Administrator"
    # InternalRelay domains keep relaying unknown addresses, postmaster@ included
    assert org(plain).recipient_for_address("postmaster@fabrikam.test") is None
    directory = RecipientDirectory(org(plain))
    entry = directory.lookup("Postmaster@Contoso.Test")
    assert entry is not None and entry.name == "Administrator"
    assert directory.lookup("postmaster@fabrikam.test") is None
    assert directory.lookup("abuse@contoso.test") is None


def test_an_organization_without_any_postmaster_is_warned_about() -> None:
    nobody = org('[[mailbox]]\nName = "Alice"\n')
    assert nobody.postmaster_recipient is None
    assert nobody.recipient_for_address("postmaster@contoso.test") is None
    (warning,) = nobody.config_warnings
    assert "postmaster@contoso.test" in warning and "RFC 5321" in warning
    # the DSN sender is not the postmaster's mailbox: an external one takes <Postmaster>
    external = org('[[mailbox]]\nName = "Alice"\n',
                   'ExternalPostmasterAddress = "hostmaster@isp.example"')
    assert external.postmaster == "hostmaster@isp.example"
    assert external.postmaster_delivery_address == "hostmaster@isp.example"
    # a holder of postmaster@ is never replaced by ExternalPostmasterAddress
    held = org('[[mailbox]]\nName = "Alice"\nEmailAddresses = ["smtp:postmaster@contoso.test"]\n',
               'ExternalPostmasterAddress = "hostmaster@isp.example"')
    assert held.postmaster_delivery_address == "postmaster@contoso.test"
    assert held.postmaster == "hostmaster@isp.example"
    assert held.config_warnings == ()


async def test_without_any_postmaster_rcpt_is_refused_and_the_daemon_warns(
        hub_factory, tmp_path: Path) -> None:
    """BASE_ORG (no Administrator, nobody holds postmaster@): refused, never accepted then
    bounced; the load warning says why."""
    port = free_port()
    extra = receive_connector("Default", [f"127.0.0.1:{port}"], **ANONYMOUS)
    async with hub_factory(extra=extra) as hub, connected(port) as client:
        assert len(hub.daemon.org.config_warnings) == 1
        await client.hello()
        assert (await client.cmd("MAIL FROM:<someone@example.org>")).code == 250
        reply = await client.cmd("RCPT TO:<Postmaster>")
        assert (reply.code, reply.enhanced) == (550, "5.1.1"), reply


def test_hubport_test_config_prints_the_postmaster_warning(tmp_path: Path) -> None:
    import subprocess

    from daemon_process import child_env, hubport_command

    path = tmp_path / "org.toml"
    path.write_text(BASE + '[[mailbox]]\nName = "Alice"\n')
    done = subprocess.run([*hubport_command(), "test-config", "--config", str(path)],
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert f"{path}: warning: no recipient holds postmaster@contoso.test" in done.stderr
    # the shipped default is warned about by nobody
    done = subprocess.run([*hubport_command(), "test-config"], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr
