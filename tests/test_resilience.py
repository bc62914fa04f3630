"""The stages outlive failures, and a reload re-routes what the old configuration held."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hubport.core import queue as q
from support import drop_files, drop_in, events, maildir, message, wait_for


async def test_categorizer_survives_a_failing_queue_read(hub_factory,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real = q.submitted_message_ids
    failures = []

    def flaky(conn, limit, now):
        if not failures:
            failures.append(now)
            raise OSError(5, "disk I/O error")
        return real(conn, limit, now)

    monkeypatch.setattr(q, "submitted_message_ids", flaky)
    async with hub_factory() as hub:
        drop_in(hub.pickup, "a.eml", message(subject="after a failure"))
        await wait_for(lambda: maildir(hub.root, "Bob"))
        assert failures, "the failure was never injected"


async def test_delivery_batch_failure_backs_off_instead_of_spinning(
        hub_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    real = q.load_messages
    calls = []

    def failing_for_delivery(conn, ids, **kw):
        if kw.get("recipient_filter", "").startswith("r.queue=?") and len(calls) < 3:
            calls.append(1)
            raise OSError(5, "disk I/O error")
        return real(conn, ids, **kw)

    monkeypatch.setattr(q, "load_messages", failing_for_delivery)
    async with hub_factory() as hub:
        drop_in(hub.pickup, "a.eml", message(subject="retried"))
        await wait_for(lambda: calls)
        started = time.monotonic()
        await wait_for(lambda: maildir(hub.root, "Bob"), timeout=15)
        assert len(calls) == 3  # three failures, each followed by a pause, then delivered
        # each failure waits MessageRetryInterval (1 s in the test org): no hot loop
        assert time.monotonic() - started >= 1.5


async def test_reload_with_an_unusable_pickup_folder_is_refused(hub_factory, tmp_path: Path) -> None:
    async with hub_factory() as hub:
        (tmp_path / "blocker").write_text("a file where a folder should be")
        config = tmp_path / "org.toml"
        config.write_text(config.read_text().replace(
            'PickupDirectoryPath = "pickup"', 'PickupDirectoryPath = "blocker/pickup"'))
        assert not await hub.daemon.reload()
        drop_in(hub.pickup, "a.eml", message(subject="still running"))
        await wait_for(lambda: maildir(hub.root, "Bob"))


async def test_queue_of_a_removed_connector_is_routed_again(hub_factory, tmp_path: Path) -> None:
    old = """
[[foreign_connector]]
Name = "Old Gateway"
AddressSpaces = ["fabrikam.test"]
DropDirectory = "old"
"""
    async with hub_factory(extra=old) as hub:  # "old" does not exist: deliveries wait
        drop_in(hub.pickup, "a.eml", message(to="someone@fabrikam.test"))
        await wait_for(lambda: events(hub.root, event_id="DEFER"))
        config = tmp_path / "org.toml"
        config.write_text(config.read_text().replace(old, """
[[foreign_connector]]
Name = "New Gateway"
AddressSpaces = ["fabrikam.test"]
CreateDropDirectory = true
"""))
        assert await hub.daemon.reload()
        files = await wait_for(lambda: drop_files(tmp_path / "drop" / "New Gateway"))
        assert b"X-Receiver: <someone@fabrikam.test>" in files[0].read_bytes()
