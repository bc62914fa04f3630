"""What a delivery agent answers reaches the queue and the tracking log as it said it.

* each recipient's own response, given to ``ack_success``, is that recipient's
  RecipientStatus in the DELIVER event (Exchange's message tracking log keeps one status per
  recipient), not one shared line;
* ``open`` returning ``DeferQueue`` puts the next-hop queue into Retry: mail that arrives
  meanwhile waits for the queue's next attempt instead of opening a connection of its own.

The agent is a plugin module beside the organization file, as an administrator's local agent
would be; the daemon runs in-process, so the test reads what the agent recorded.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from hubport.core.queue_admin import QueueAdmin
from hubport.plugins.pytest_plugin import Hub, RetryClock, message
from support import wait_for_value

pytestmark = pytest.mark.timeout(120)

AGENT = '''
from hubport.core.api import DeferQueue, DeliveryAgent, ItemResult
from hubport.core import hookimpl
from hubport.core.model import SmtpResponse

OPENS = []       # one entry per connection the transport opened
DELIVERED = []   # subjects, in delivery order
DOWN = [False]   # the test's switch: open() answers DeferQueue while True

class Reception(DeliveryAgent):
    async def open(self, next_hop):
        OPENS.append(next_hop.connector)
        if DOWN[0]:
            return DeferQueue(SmtpResponse(421, "4.4.2", "Gateway unreachable"), retry_in=600)
        return None

    async def deliver(self, item):
        DELIVERED.append(item.message.subject)
        result = ItemResult(detail="reception-gateway")
        for n, r in enumerate(item.recipients):
            local = r.address.split("@")[0]
            result.ack_success(r, SmtpResponse(250, "2.6.0", f"Queued as {local}-{n + 17}"))
        return result

@hookimpl
def register_delivery_agents(register):
    register("RECEPTION", Reception)
'''

CONNECTOR = '''
[hubport]
Plugins = ["reception_agent"]

[[delivery_agent_connector]]
Name = "Reception"
AddressSpaces = ["SMTP:reception.test;1"]
DeliveryProtocol = "RECEPTION"
'''


def agent(tmp_path: Path) -> None:
    """Write the agent module beside the organization (a fresh import for each test)."""
    (tmp_path / "reception_agent.py").write_text(AGENT)
    sys.modules.pop("reception_agent", None)


async def test_each_recipient_keeps_its_own_response_in_the_deliver_event(
        hubport_hub_factory: Any, tmp_path: Path) -> None:
    agent(tmp_path)
    async with hubport_hub_factory(extra=CONNECTOR) as hub:
        hub.drop_replay("alice@contoso.test", ["ann@reception.test", "ben@reception.test"],
                        message(subject="two"))
        delivered = await wait_for_value(
            lambda: hub.events(event_id="DELIVER", source="AGENT"),
            lambda found: {a for e in found for a in e["recipient-address"]} ==
            {"ann@reception.test", "ben@reception.test"}, "DELIVER for ann and ben")
    status = {a: s for e in delivered
              for a, s in zip(e["recipient-address"], e["recipient-status"], strict=True)}
    assert status == {"ann@reception.test": "250 2.6.0 Queued as ann-17",
                      "ben@reception.test": "250 2.6.0 Queued as ben-18"}
    # what the agent named (ItemResult.detail) stays the event's source context
    assert {e["source-context"] for e in delivered} == {"reception-gateway"}
    assert {e["connector-id"] for e in delivered} == {"Reception"}


async def queue_row(hub: Hub, what: str, **wanted: Any) -> dict[str, Any]:
    """Wait for the Reception queue's Get-Queue row to show every ``wanted`` value; fail
    naming ``what`` and the row last seen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        rows = await QueueAdmin(hub.pipeline).get_queue()
        row = next((r for r in rows if r.get("connector") == "Reception"), None)
        if row is not None and all(row.get(k) == v for k, v in wanted.items()):
            return row
        if loop.time() > deadline:
            raise AssertionError(f"{what} not seen within 30s; last Get-Queue row: {row!r}")
        await asyncio.sleep(0.05)


async def test_defer_queue_from_open_puts_the_queue_in_retry_and_new_mail_waits(
        hubport_hub_factory: Any, hubport_clock: RetryClock, tmp_path: Path) -> None:
    agent(tmp_path)
    async with hubport_hub_factory(extra=CONNECTOR, clock=hubport_clock) as hub:
        module = sys.modules["reception_agent"]
        module.DOWN[0] = True
        hub.drop_replay("alice@contoso.test", ["ann@reception.test"], message(subject="m1"))
        row = await queue_row(hub, "the Reception queue in Retry", status="Retry")
        assert module.OPENS == ["Reception"] and module.DELIVERED == []
        assert row["last_error"].startswith("421 4.4.2 Gateway unreachable")
        assert row["next_retry"] == pytest.approx(row["last_retry"] + 600)  # the agent's wish

        # mail arriving while the queue is in Retry joins it and waits for the queue's retry
        for n in (2, 3):
            hub.drop_replay("alice@contoso.test", [f"u{n}@reception.test"],
                            message(subject=f"m{n}"))
        row = await queue_row(hub, "three messages in the Reception queue", message_count=3)
        items = await QueueAdmin(hub.pipeline).get_message(queue=row["identity"])
        assert sorted(i["subject"] for i in items) == ["m1", "m2", "m3"]
        assert {i["status"] for i in items} == {"Retry"}
        assert {i["next_retry"] for i in items} == {row["next_retry"]}
        assert module.OPENS == ["Reception"], "a new message opened a connection"
        assert row["status"] == "Retry" and row["retry_count"] == 1

        # the gateway is back: at the queue's retry one connection takes all three
        module.DOWN[0] = False
        hubport_clock.advance(601)
        await queue_row(hub, "an empty Ready queue", message_count=0, status="Ready")
        assert sorted(module.DELIVERED) == ["m1", "m2", "m3"]
        assert module.OPENS == ["Reception", "Reception"]
    delivered = hub.events(event_id="DELIVER", source="AGENT")
    assert sorted(a for e in delivered for a in e["recipient-address"]) == [
        "ann@reception.test", "u2@reception.test", "u3@reception.test"]
