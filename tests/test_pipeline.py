"""The walk of a message through an in-process daemon: folders → queue → categorizer → delivery."""

from __future__ import annotations

from email import message_from_bytes

from hubport.core import queue as q
from support import (
    drop_files,
    drop_in,
    event_ids,
    events,
    maildir,
    message,
    read_mail,
    replay_file,
    wait_for,
)


async def test_pickup_delivers_to_mailboxes_expands_groups_once(hub_factory) -> None:
    async with hub_factory() as hub:
        drop_in(hub.pickup, "a.eml", message(to="bob@contoso.test, staff@contoso.test"))
        await wait_for(lambda: maildir(hub.root, "Alice") and maildir(hub.root, "Bob"))
        await wait_for(lambda: "DELIVER" in event_ids(hub.root))
        assert len(maildir(hub.root, "Bob")) == 1  # direct and through the group: one copy
        assert len(maildir(hub.root, "Alice")) == 1  # nested group loop: expanded once
        got = read_mail(maildir(hub.root, "Bob")[0])
        assert got["Return-Path"] == "<alice@contoso.test>"
        assert got["Subject"] == "hello"
        assert not list(hub.pickup.glob("*.eml"))
        ids = await wait_for(lambda: event_ids(hub.root))
        assert ids[0] == "RECEIVE" and "EXPAND" in ids


async def test_secondary_address_resolves_to_primary_with_orcpt(hub_factory) -> None:
    async with hub_factory() as hub:
        drop_in(hub.replay, "r.eml", replay_file("bob@contoso.test", ["Alice.Smith@contoso.test"],
                                                 message(to="whoever@contoso.test")))
        await wait_for(lambda: maildir(hub.root, "Alice"))
        resolve = await wait_for(lambda: events(hub.root, event_id="RESOLVE"))
        assert resolve[0]["recipient-address"] == ["alice@contoso.test"]
        assert resolve[0]["related-recipient-address"] == "Alice.Smith@contoso.test"
        # replay trusts the envelope, not the visible To:
        assert not maildir(hub.root, "Bob")


async def test_unknown_authoritative_recipient_gets_ndr_5_1_1(hub_factory) -> None:
    async with hub_factory() as hub:
        drop_in(hub.pickup, "a.eml", message(to="nobody@contoso.test, bob@contoso.test"))
        ndr = await wait_for(lambda: maildir(hub.root, "Alice"))
        report = message_from_bytes(ndr[0].read_bytes())
        assert report.get_content_type() == "multipart/report"
        status = report.get_payload()[1].get_payload()
        fields = {k.lower(): v for block in status for k, v in block.items()}
        assert fields["final-recipient"] == "rfc822;nobody@contoso.test"
        assert fields["status"] == "5.1.1"
        assert report["From"].endswith("<postmaster@contoso.test>")
        assert len(maildir(hub.root, "Bob")) == 1
        await wait_for(lambda: {"FAIL", "DSN"} <= set(event_ids(hub.root)))


async def test_fax_recipient_goes_to_foreign_connector_drop(hub_factory) -> None:
    async with hub_factory() as hub:
        drop_in(hub.pickup, "f.eml", message(to='"Fax" <IMCEAFAX-+2B15551234@contoso.test>'))
        files = await wait_for(lambda: drop_files(hub.drop))
        data = files[0].read_bytes()
        assert data.startswith(b"X-Sender: <alice@contoso.test>")
        assert b"X-Receiver: <IMCEAFAX-+2B15551234@contoso.test>" in data
        assert "NonSmtpGatewayDelivery" not in files[0].name  # names come from queue ids only
        deliver = await wait_for(lambda: events(hub.root, event_id="DELIVER"))
        assert deliver[0]["source"] == "GATEWAY"


async def test_mail_contact_with_fax_address_is_encapsulated(hub_factory) -> None:
    async with hub_factory() as hub:
        drop_in(hub.pickup, "c.eml", message(to="FaxReception@contoso.test"))
        files = await wait_for(lambda: drop_files(hub.drop))
        assert b"X-Receiver: <IMCEAFAX-+2B15551234@contoso.test>" in files[0].read_bytes()


async def test_external_recipient_without_connector_is_unreachable_then_reevaluated(
        hub_factory, tmp_path) -> None:
    async with hub_factory() as hub:
        drop_in(hub.pickup, "u.eml", message(to="someone@fabrikam.test"))

        async def unreachable() -> int:
            rows = await hub.store.read(q.queue_summary)
            return next(r["message_count"] for r in rows if r["queue"] == "Unreachable")

        for _ in range(100):
            if await unreachable() == 1:
                break
            await wait_for(lambda: True, interval=0.05)
        assert await unreachable() == 1
        # an administrator adds a Foreign connector for the domain: the reload re-routes it
        config = tmp_path / "org.toml"
        config.write_text(config.read_text() + """
[[foreign_connector]]
Name = "Fabrikam Gateway"
AddressSpaces = ["fabrikam.test"]
CreateDropDirectory = true
""")
        assert await hub.daemon.reload()
        files = await wait_for(lambda: drop_files(tmp_path / "drop" / "Fabrikam Gateway"))
        assert b"X-Receiver: <someone@fabrikam.test>" in files[0].read_bytes()
        assert await unreachable() == 0


async def test_bad_config_change_is_refused_and_running_config_kept(hub_factory, tmp_path) -> None:
    async with hub_factory() as hub:
        config = tmp_path / "org.toml"
        good = config.read_text()
        config.write_text(good + "\n[[mailbox]]\nName = \"Carol\"\nBogusField = 1\n")
        assert not await hub.daemon.reload()
        drop_in(hub.pickup, "a.eml", message())
        await wait_for(lambda: maildir(hub.root, "Bob"))


async def test_bifurcation_one_item_per_next_hop(hub_factory) -> None:
    async with hub_factory() as hub:
        drop_in(hub.pickup, "b.eml",
                message(to="bob@contoso.test, IMCEAFAX-+2B15551234@contoso.test"))
        await wait_for(lambda: maildir(hub.root, "Bob") and drop_files(hub.drop))
        transfer = await wait_for(lambda: events(hub.root, event_id="TRANSFER"))
        assert transfer[0]["source"] == "ROUTING"


async def test_bcc_only_pickup_gets_undisclosed_to_and_no_bcc_header(hub_factory) -> None:
    async with hub_factory() as hub:
        data = b"From: alice@contoso.test\nBcc: bob@contoso.test\nSubject: s\n\nx\n"
        drop_in(hub.pickup, "bcc.eml", data)
        box = await wait_for(lambda: maildir(hub.root, "Bob"))
        got = box[0].read_bytes()
        assert b"\nBcc:" not in got
        assert b"To: Undisclosed recipients:;" in got


async def test_notify_success_gives_delivered_dsn_for_mailbox_delivery(hub_factory) -> None:
    async with hub_factory() as hub:
        data = (b"X-Sender: <alice@contoso.test> ENVID=abc123\n"
                b"X-Receiver: <bob@contoso.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@contoso.test\n"
                + message())
        drop_in(hub.replay, "s.eml", data)
        dsn = await wait_for(lambda: maildir(hub.root, "Alice"))
        report = message_from_bytes(dsn[0].read_bytes())
        fields = {k.lower(): v for block in report.get_payload()[1].get_payload()
                  for k, v in block.items()}
        assert fields["action"] == "delivered"
        assert fields["original-envelope-id"] == "abc123"
        assert len(maildir(hub.root, "Bob")) == 1


async def test_relay_dsn_only_when_the_foreign_connector_requires_it(hub_factory) -> None:
    data = (b"X-Sender: <alice@contoso.test>\n"
            b"X-Receiver: <IMCEAFAX-+2B15551234@contoso.test> NOTIFY=SUCCESS\n" + message())
    async with hub_factory(foreign_extra="RelayDsnRequired = true") as hub:
        drop_in(hub.replay, "s.eml", data)
        dsn = await wait_for(lambda: maildir(hub.root, "Alice"))
        assert b"Action: relayed" in dsn[0].read_bytes()


async def test_no_relay_dsn_without_relay_dsn_required(hub_factory) -> None:
    data = (b"X-Sender: <alice@contoso.test>\n"
            b"X-Receiver: <IMCEAFAX-+2B15551234@contoso.test> NOTIFY=SUCCESS\n" + message())
    async with hub_factory() as hub:
        drop_in(hub.replay, "s.eml", data)
        await wait_for(lambda: drop_files(hub.drop))
        await wait_for(lambda: "DELIVER" in event_ids(hub.root))
        assert not maildir(hub.root, "Alice")
        assert "DSN" not in event_ids(hub.root)
