"""Delivery Agent connectors and the delivery-agent API: every acknowledgement kind, every
failure path (open deferring or failing the queue, per-recipient mixes, exceptions, hangs),
the connection split, config errors, and the built-in HTTP and command agents end to end."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hubport.agents.http import retry_after
from hubport.core.agent_runner import AGENT_TIMEOUT, run_agent, run_connections
from hubport.core.api import (
    DEFERRED,
    DELIVERED,
    FAILED,
    DeferQueue,
    DeliveryAgent,
    DeliveryContext,
    FailQueue,
    ItemResult,
    MailItem,
    recipient_address,
)
from hubport.core.config import parse_organization
from hubport.core.config_fields import ConfigErrors
from hubport.core.hooks import Hooks
from hubport.core.model import NextHop
from hubport.core.model import SmtpResponse as R
from hubport.plugins.pytest_plugin import BASE_ORG, AgentHarness, mail_item, message, wait_for

HOP = NextHop("DeliveryAgent", "agent.test", "Agent")


def item(n: int, recipients: int = 1) -> MailItem:
    """Message ``n`` with recipients ``r0@agent.test``... (ids ``n * 100 + i``)."""
    return mail_item(recipients=[f"r{i}@agent.test" for i in range(recipients)],
                     data=b"Subject: x\r\n\r\nhi", message_id=n, next_hop=HOP)


def context() -> DeliveryContext:
    """The context a Delivery Agent connector is handed (the kit's, on ``BASE_ORG``)."""
    return AgentHarness(Scripted).context


class Scripted(DeliveryAgent):
    """An agent whose behaviour the test sets on the class."""

    opened: Any = None
    behaviour: Any = None
    log: list[str] = []

    async def open(self, next_hop: NextHop) -> Any:
        Scripted.log.append("open")
        return Scripted.opened

    async def deliver(self, item: MailItem) -> ItemResult:
        Scripted.log.append(f"deliver {item.message.id}")
        return await Scripted.behaviour(item)

    async def close(self) -> None:
        Scripted.log.append("close")


@pytest.fixture(autouse=True)
def _reset() -> None:
    Scripted.opened, Scripted.behaviour, Scripted.log = None, None, []


async def kinds(outcome: Any) -> list[dict[int, tuple[str, str, float | None]]]:
    return [{rid: (r.kind, str(r.response), r.retry_in) for rid, r in res.recipients.items()}
            for res in outcome]


# -- the runner: every acknowledgement and failure path -------------------------------------


async def test_item_acknowledgements_success_defer_with_retry_and_fail() -> None:
    async def behave(i: MailItem) -> ItemResult:
        if i.message.id == 1:
            return ItemResult.success(i)
        if i.message.id == 2:
            return ItemResult.defer(i, R(451, "4.4.0", "later"), retry_in=42)
        return ItemResult.fail(i, R(550, "5.1.1", "no such user"))

    Scripted.behaviour = behave
    out = await run_agent(Scripted, None, HOP, [item(1), item(2), item(3)], context())
    assert await kinds(out) == [{100: (DELIVERED, "250 2.0.0 OK", None)},
                                {200: (DEFERRED, "451 4.4.0 later", 42)},
                                {300: (FAILED, "550 5.1.1 no such user", None)}]
    assert Scripted.log == ["open", "deliver 1", "deliver 2", "deliver 3", "close"]


async def test_per_recipient_mix() -> None:
    async def behave(i: MailItem) -> ItemResult:
        result = ItemResult()
        a, b, c = i.recipients
        result.ack_success(a)
        result.ack_defer(b, R(452, "4.2.2", "full"), retry_in=5)
        result.ack_fail(c, R(550, "5.1.1", "unknown"))
        return result

    Scripted.behaviour = behave
    [res] = await kinds(await run_agent(Scripted, None, HOP, [item(1, 3)], context()))
    assert res == {100: (DELIVERED, "250 2.0.0 OK", None), 101: (DEFERRED, "452 4.2.2 full", 5),
                   102: (FAILED, "550 5.1.1 unknown", None)}


def test_acknowledgements_refuse_the_wrong_class_of_response() -> None:
    with pytest.raises(ValueError, match="4xx"):
        ItemResult.defer(item(1), R(550, "5.0.0", "x"))
    with pytest.raises(ValueError, match="5xx"):
        ItemResult.fail(item(1), R(451, "4.0.0", "x"))


@pytest.mark.parametrize("opened", [DeferQueue(R(421, "4.4.2", "down"), retry_in=30),
                                    FailQueue(R(554, "5.4.0", "gone"))])
async def test_open_defers_or_fails_the_whole_queue(opened: Any) -> None:
    Scripted.opened = opened
    assert await run_agent(Scripted, None, HOP, [item(1)], context()) == opened
    assert Scripted.log == ["open", "close"]  # nothing delivered, the connection closed


async def test_an_exception_defers_its_item_only_and_close_still_runs() -> None:
    async def behave(i: MailItem) -> ItemResult:
        if i.message.id == 1:
            raise RuntimeError("agent bug")
        return ItemResult.success(i)

    Scripted.behaviour = behave
    out = await kinds(await run_agent(Scripted, None, HOP, [item(1), item(2)], context()))
    assert out == [{100: (DEFERRED, "451 4.3.0 Local error in processing", None)},
                   {200: (DELIVERED, "250 2.0.0 OK", None)}]
    assert Scripted.log[-1] == "close"

    class Batch(DeliveryAgent):  # its own deliver_many answers for the whole batch
        async def deliver_many(self, items: Any) -> Any:
            raise RuntimeError("batch bug")

    assert isinstance(await run_agent(Batch, None, HOP, [item(1)], context()), DeferQueue)

    class Opens(DeliveryAgent):
        async def open(self, next_hop: NextHop) -> Any:
            raise OSError("cannot connect")

    assert isinstance(await run_agent(Opens, None, HOP, [item(1)], context()), DeferQueue)


async def test_a_hanging_agent_is_timed_out_and_the_rest_deferred() -> None:
    async def behave(i: MailItem) -> ItemResult:
        if i.message.id == 2:
            await asyncio.sleep(3600)
        return ItemResult.success(i)

    Scripted.behaviour = behave
    out = await run_agent(Scripted, None, HOP, [item(1), item(2), item(3)], context(),
                          timeout=0.5)
    assert await kinds(out) == [{100: (DELIVERED, "250 2.0.0 OK", None)},
                                {200: (DEFERRED, str(AGENT_TIMEOUT), None)},
                                {300: (DEFERRED, str(AGENT_TIMEOUT), None)}]
    assert Scripted.log[-1] == "close"


async def test_results_of_the_wrong_shape_defer() -> None:
    class Wrong(DeliveryAgent):
        async def deliver_many(self, items: Any) -> Any:
            return [None]

    class NoResult(DeliveryAgent):
        async def deliver(self, item: MailItem) -> Any:
            return "ok"

    assert isinstance(await run_agent(Wrong, None, HOP, [item(1)], context()), DeferQueue)
    [res] = await run_agent(NoResult, None, HOP, [item(1)], context())
    assert res.recipients[100].kind == DEFERRED


async def test_connections_split_by_messages_per_connection_and_bounded_concurrency() -> None:
    live, peak = 0, 0

    async def behave(i: MailItem) -> ItemResult:
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        await asyncio.sleep(0.01)
        live -= 1
        return ItemResult.success(i)

    Scripted.behaviour = behave
    out = await run_connections(Scripted, None, HOP, [item(n) for n in range(1, 8)], context(),
                                per_connection=2, semaphore=asyncio.Semaphore(2))
    assert [list(r.recipients) for r in out] == [[n * 100] for n in range(1, 8)]  # in order
    assert Scripted.log.count("open") == 4 and Scripted.log.count("close") == 4
    assert peak <= 2


async def test_a_queue_answer_of_one_connection_applies_to_its_items_only() -> None:
    calls = 0

    class Flaky(Scripted):
        async def open(self, next_hop: NextHop) -> Any:
            nonlocal calls
            calls += 1
            return DeferQueue(R(421, "4.4.2", "busy"), 7) if calls == 1 else None

    async def behave(i: MailItem) -> ItemResult:
        return ItemResult.success(i)

    Scripted.behaviour = behave
    out = await run_connections(Flaky, None, HOP, [item(1), item(2)], context(),
                                per_connection=1, semaphore=asyncio.Semaphore(1))
    assert await kinds(out) == [{100: (DEFERRED, "421 4.4.2 busy", 7)},
                                {200: (DELIVERED, "250 2.0.0 OK", None)}]
    Scripted.opened = FailQueue(R(554, "5.4.0", "gone"))  # every connection: queue-level
    assert await run_connections(Scripted, None, HOP, [item(1), item(2)], context(),
                                 per_connection=1, semaphore=asyncio.Semaphore(1)) \
        == Scripted.opened


async def test_mixed_queue_answers_of_connections_apply_per_connection() -> None:
    """One connection defers its queue, another fails it: each answer for its own items."""
    calls = 0

    class Mixed(Scripted):
        async def open(self, next_hop: NextHop) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                return DeferQueue(R(421, "4.4.2", "busy"), 7)
            return FailQueue(R(554, "5.4.0", "gone"))

    out = await run_connections(Mixed, None, HOP, [item(1), item(2)], context(),
                                per_connection=1, semaphore=asyncio.Semaphore(1))
    assert await kinds(out) == [{100: (DEFERRED, "421 4.4.2 busy", 7)},
                                {200: (FAILED, "554 5.4.0 gone", None)}]


def test_retry_after_seconds_and_http_date() -> None:
    assert retry_after("120", 0) == 120
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470) == 10
    assert retry_after("soon", 0) is None and retry_after(None, 0) is None


# -- configuration ---------------------------------------------------------------------------


def load(extra: str) -> Any:
    hooks = Hooks(entry_points=False)
    text = BASE_ORG.format(server_extra="", foreign_extra="", extra=extra)
    return parse_organization(text, source="org.toml", base_dir=Path("/tmp"),
                              connector_types=hooks.registry.connector_types,
                              delivery_agents=hooks.registry.delivery_agents)


def test_connector_fields_defaults_and_agent_settings() -> None:
    org = load('[[delivery_agent_connector]]\nName = "Web"\nAddressSpaces = ["SMTP:web.test;1"]\n'
               'DeliveryProtocol = "http"\nUrl = "http://127.0.0.1:8080/mail"\n')
    web = org.connector("Web")
    assert (web.delivery_protocol, web.max_concurrent_connections,
            web.max_messages_per_connection, web.connection_timeout) == ("HTTP", 5, 20, 300.0)
    assert web.settings.port == 8080 and web.settings.path == "/mail"
    assert type(web).kind == "DeliveryAgentConnector" and type(web).delivery_type == "DeliveryAgent"


def test_unknown_delivery_protocol_and_bad_agent_fields_are_config_errors() -> None:
    with pytest.raises(ConfigErrors) as caught:
        load('[[delivery_agent_connector]]\nName = "Sms"\nAddressSpaces = ["SMS:*;1"]\n'
             'DeliveryProtocol = "PIGEON"\n\n'
             '[[delivery_agent_connector]]\nName = "Cmd"\nAddressSpaces = ["X400:*;1"]\n'
             'DeliveryProtocol = "COMMAND"\nComand = ["true"]\nMaxConcurrentConnections = 0\n')
    text = str(caught.value)
    assert ('org.toml: delivery_agent_connector "Sms": DeliveryProtocol: no delivery agent '
            'serves "PIGEON"') in text
    assert 'delivery_agent_connector "Cmd": Command: required' in text
    assert 'delivery_agent_connector "Cmd": Comand: unknown field' in text
    assert "MaxConcurrentConnections" in text


def test_drop_protocol_on_a_delivery_agent_connector_is_a_config_error() -> None:
    """DROP writes a Foreign connector's Drop directory; named by a Delivery Agent connector
    it used to load, then crash on every delivery until the message went to Poison."""
    with pytest.raises(ConfigErrors) as caught:
        load('[[delivery_agent_connector]]\nName = "Fax"\nAddressSpaces = ["FAX:*;1"]\n'
             'DeliveryProtocol = "drop"\n')
    assert [str(e) for e in caught.value.errors] == [
        'org.toml: delivery_agent_connector "Fax": DeliveryProtocol: "DROP" writes the Drop'
        ' directory of a Foreign connector; configure a [[foreign_connector]] with'
        ' DropDirectory instead']


def test_an_agent_class_that_is_not_a_delivery_agent_is_a_config_error() -> None:
    class Pigeon:  # registered by a plugin, but not a DeliveryAgent
        pass

    hooks = Hooks(entry_points=False)
    hooks.registry.add_delivery_agent("PIGEON", Pigeon)
    text = BASE_ORG.format(server_extra="", foreign_extra="", extra=(
        '[[delivery_agent_connector]]\nName = "Loft"\nAddressSpaces = ["PIGEON:*;1"]\n'
        'DeliveryProtocol = "pigeon"\n'))
    with pytest.raises(ConfigErrors) as caught:
        parse_organization(text, source="org.toml", base_dir=Path("/tmp"),
                           connector_types=hooks.registry.connector_types,
                           delivery_agents=hooks.registry.delivery_agents)
    assert [str(e) for e in caught.value.errors] == [
        'org.toml: delivery_agent_connector "Loft": DeliveryProtocol: the agent registered for'
        ' "pigeon" (test_an_agent_class_that_is_not_a_delivery_agent_is_a_config_error.<locals>'
        '.Pigeon) does not subclass DeliveryAgent']


# -- end to end through a daemon -------------------------------------------------------------

LOCAL_AGENT = '''
import asyncio
from hubport.core.api import DeferQueue, DeliveryAgent, ItemResult
from hubport.core import hookimpl
from hubport.core.model import SmtpResponse

SEEN = []

class LabAgent(DeliveryAgent):
    async def deliver(self, item):
        SEEN.append(item.message.subject)
        result = ItemResult()
        for r in item.recipients:
            local = r.address.split("@")[0]
            if local == "ok":
                result.ack_success(r)
            elif local == "bad":
                result.ack_fail(r, SmtpResponse(550, "5.1.1", "Lab says no such user"))
            elif local == "later":
                tries = SEEN.count(item.message.subject)
                if tries < 3:
                    result.ack_defer(r, SmtpResponse(451, "4.3.2", "Lab busy"), retry_in=0.2)
                else:
                    result.ack_success(r)
            elif local == "boom":
                raise RuntimeError("lab agent crashed")
            elif local == "hang":
                await asyncio.sleep(3600)
        return result

@hookimpl
def register_delivery_agents(register):
    register("LAB", LabAgent)
'''

LAB_CONNECTOR = '''
[hubport]
Plugins = ["lab_agent_plugin"]

[[delivery_agent_connector]]
Name = "Lab"
AddressSpaces = ["SMTP:lab.test;1"]
DeliveryProtocol = "LAB"

[[delivery_agent_connector]]
Name = "Lab Slow"
AddressSpaces = ["SMTP:slow.test;1"]
DeliveryProtocol = "lab"
ConnectionTimeout = "1s"
'''


async def test_end_to_end_success_fail_ndr_defer_retry_exception_and_hang(
        hubport_hub_factory: Any, tmp_path: Path) -> None:
    (tmp_path / "lab_agent_plugin.py").write_text(LOCAL_AGENT)
    sys.modules.pop("lab_agent_plugin", None)
    async with hubport_hub_factory(extra=LAB_CONNECTOR) as hub:
        hub.drop_replay("alice@contoso.test", ["ok@lab.test", "bad@lab.test"],
                        message(subject="mix"))
        hub.drop_replay("alice@contoso.test", ["later@lab.test"], message(subject="later"))
        hub.drop_replay("alice@contoso.test", ["boom@lab.test"], message(subject="boom"))
        hub.drop_replay("alice@contoso.test", ["hang@slow.test"], message(subject="hang"))
        await wait_for(lambda: hub.events(event_id="DELIVER", source="AGENT",
                                          recipients=["later@lab.test"]), timeout=30)
        ndr = await wait_for(lambda: hub.maildir("Alice"), timeout=20)
        await wait_for(lambda: hub.events(event_id="DEFER", recipients=["boom@lab.test"]))
        await wait_for(lambda: hub.events(event_id="DEFER", recipients=["hang@slow.test"]),
                       timeout=20)
    assert b"Lab says no such user" in ndr[0].read_bytes()
    delivered = hub.events(event_id="DELIVER", source="AGENT")
    assert {r for e in delivered for r in e["recipient-address"]} == {"ok@lab.test",
                                                                     "later@lab.test"}
    assert any("4.3.2 Lab busy" in s for e in hub.events(event_id="DEFER")
               for s in e["recipient-status"])
    boom = hub.events(event_id="DEFER", recipients=["boom@lab.test"])[0]
    assert "451 4.3.0" in boom["recipient-status"][0]
    hang = hub.events(event_id="DEFER", recipients=["hang@slow.test"])[0]
    assert "4.4.1" in hang["recipient-status"][0]
    assert "Lab" in {e["connector-id"] for e in delivered}


async def test_an_agent_that_keeps_raising_sends_its_message_to_poison(
        hubport_hub_factory: Any, tmp_path: Path) -> None:
    """Each exception is a crash; past PoisonThreshold (2) the message goes to Poison and is
    not retried, while other messages of the same connector are delivered."""
    (tmp_path / "lab_agent_plugin.py").write_text(LOCAL_AGENT)
    sys.modules.pop("lab_agent_plugin", None)
    async with hubport_hub_factory(extra=LAB_CONNECTOR,
                                   server_extra="PoisonThreshold = 2") as hub:
        hub.drop_replay("alice@contoso.test", ["boom@lab.test"], message(subject="boom"))
        await wait_for(lambda: hub.events(event_id="POISONMESSAGE",
                                          recipients=["boom@lab.test"]), timeout=30)
        hub.drop_replay("alice@contoso.test", ["ok@lab.test"], message(subject="fine"))
        await wait_for(lambda: hub.events(event_id="DELIVER", recipients=["ok@lab.test"]),
                       timeout=30)
        state = await hub.pipeline.store.read(lambda c: c.execute(
            "SELECT state, crash_count FROM message WHERE subject='boom'").fetchone())
        assert tuple(state) == ("poison", 3)
        tries = len(hub.events(event_id="DEFER", recipients=["boom@lab.test"]))
        await asyncio.sleep(2.5)  # past the 1 s retry interval: nothing more happens
        assert len(hub.events(event_id="DEFER", recipients=["boom@lab.test"])) == tries == 3


class GatewayServer:
    """A tiny HTTP server: answers from a script, records the JSON bodies."""

    def __init__(self, answers: list[tuple[int, dict[str, str]]]) -> None:
        self.answers = answers
        self.bodies: list[dict[str, Any]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        self.bodies.append(json.loads(await reader.readexactly(length)))
        status, headers = self.answers.pop(0) if self.answers else (200, {})
        interim = headers.pop("interim", None)
        if interim:  # e.g. 100 Continue first: the real answer follows
            writer.write(f"HTTP/1.1 {interim} Continue\r\n\r\n".encode())
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"HTTP/1.1 {status} X\r\n{extra}Content-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()


async def test_http_agent_success_fail_and_retry_after(hubport_hub_factory: Any) -> None:
    gateway = GatewayServer([(503, {"Retry-After": "1"}), (200, {"interim": "100"}),
                             (404, {})])
    server = await asyncio.start_server(gateway.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    extra = (f'[[delivery_agent_connector]]\nName = "Web"\nAddressSpaces = ["SMTP:web.test;1"]\n'
             f'DeliveryProtocol = "HTTP"\nUrl = "http://127.0.0.1:{port}/in"\nTimeout = "5s"\n')
    async with server, hubport_hub_factory(extra=extra) as hub:
        hub.drop_replay("alice@contoso.test", ["a@web.test"], message(subject="one"))
        await wait_for(lambda: hub.events(event_id="DELIVER", source="AGENT"), timeout=30)
        hub.drop_replay("alice@contoso.test", ["b@web.test"], message(subject="two"))
        ndr = await wait_for(lambda: hub.maildir("Alice"), timeout=30)
    first = gateway.bodies[0]
    assert first["recipients"] == ["a@web.test"] and first["sender"] == "alice@contoso.test"
    assert gateway.bodies[1] == first  # the 503 was retried
    defer = hub.events(event_id="DEFER", recipients=["a@web.test"])[0]
    assert "HTTP 503" in defer["recipient-status"][0]
    assert b"HTTP 404" in ndr[0].read_bytes()


COMMAND = '''
import os, sys
data = sys.stdin.buffer.read()
rcpts = os.environ["HUBPORT_RECIPIENTS"].split("\\n")
out = os.environ["OUT"] if "OUT" in os.environ else sys.argv[1]
with open(out, "ab") as fh:
    fh.write(("%s|%s|%d\\n" % (os.environ["HUBPORT_SENDER"], ",".join(rcpts), len(data))).encode())
if rcpts[0].startswith("temp"):
    sys.exit(75)
if rcpts[0].startswith("perm"):
    sys.stderr.write("no such pager\\n")
    sys.exit(1)
'''


async def test_command_agent_exit_codes_environment_and_timeout(hubport_hub_factory: Any,
                                                                tmp_path: Path) -> None:
    script = tmp_path / "gw.py"
    script.write_text(COMMAND)
    out = tmp_path / "calls.txt"
    extra = ('[[delivery_agent_connector]]\nName = "Cmd"\nAddressSpaces = ["SMTP:cmd.test;1"]\n'
             f'DeliveryProtocol = "COMMAND"\nCommand = ["{sys.executable}", "{script}", "{out}"]\n'
             '\n[[delivery_agent_connector]]\nName = "Slow"\nAddressSpaces = ["SMTP:slow.test;1"]\n'
             f'DeliveryProtocol = "COMMAND"\nCommand = ["sleep", "30"]\nTimeout = "1s"\n'
             '\n[[delivery_agent_connector]]\nName = "Leaves a child"\n'
             'AddressSpaces = ["SMTP:child.test;1"]\nDeliveryProtocol = "COMMAND"\n'
             'Command = ["sh", "-c", "cat >/dev/null; (sleep 30 >/dev/null) & exit 0"]\n'
             'Timeout = "1s"\n')
    async with hubport_hub_factory(extra=extra) as hub:
        hub.drop_replay("alice@contoso.test", ["ok@cmd.test"], message(subject="ok"))
        hub.drop_replay("alice@contoso.test", ["perm@cmd.test"], message(subject="perm"))
        hub.drop_replay("alice@contoso.test", ["temp@cmd.test"], message(subject="temp"))
        hub.drop_replay("alice@contoso.test", ["x@slow.test"], message(subject="slow"))
        await wait_for(lambda: hub.events(event_id="DELIVER", recipients=["ok@cmd.test"]))
        ndr = await wait_for(lambda: hub.maildir("Alice"), timeout=20)
        await wait_for(lambda: hub.events(event_id="DEFER", recipients=["temp@cmd.test"]))
        await wait_for(lambda: hub.events(event_id="DEFER", recipients=["x@slow.test"]),
                       timeout=20)
        hub.drop_replay("alice@contoso.test", ["y@child.test"], message(subject="child"))
        await wait_for(lambda: hub.events(event_id="DELIVER", recipients=["y@child.test"]),
                       timeout=20)  # its exit 0 counts; the child left behind is killed
    assert not hub.events(event_id="DEFER", recipients=["y@child.test"])
    lines = out.read_text().splitlines()
    assert "alice@contoso.test|ok@cmd.test|" in "\n".join(lines)
    assert b"no such pager" in ndr[0].read_bytes()
    assert "4.4.1" in hub.events(event_id="DEFER", recipients=["x@slow.test"])[0][
        "recipient-status"][0]


# -- documentation ---------------------------------------------------------------------------


def test_every_agent_api_member_is_documented_in_docs_agents_md() -> None:
    from hubport.core import api
    from support import undocumented_members

    text = (Path(__file__).resolve().parents[1] / "docs" / "agents.md").read_text()
    for cls in (api.DeliveryAgent, api.ItemResult, api.RecipientResult):
        missing = undocumented_members(
            cls, text, skip=("protocol", "recipients", "detail", "void_intents"))
        assert not missing, f"{cls.__name__} members missing from docs/agents.md: {missing}"
    for cls in (api.DeferQueue, api.FailQueue, api.MailItem, api.DeliveryContext):
        assert f"`{cls.__name__}" in text, cls.__name__


async def test_plugin_kit_fake_smtp_server_scripts_a_retry(
        hubport_hub_factory: Any, hubport_smtp_server: Any) -> None:
    """The plugin kit's fake downstream server: a scripted 4xx, then the retry succeeds."""
    server = hubport_smtp_server
    server.script("RCPT", "451 4.3.2 try again later")
    smart_host = f"""
[[send_connector]]
Name = "Outbound"
AddressSpaces = ["SMTP:partner.example;1"]
DNSRoutingEnabled = false
SmartHosts = ["[{server.host}]"]
Port = {server.port}
"""
    async with hubport_hub_factory(extra=smart_host) as hub:
        hub.drop_replay("alice@contoso.test", ["carol@partner.example"],
                        message(subject="via the fake server"))
        await wait_for(lambda: server.messages, timeout=30)
        deferred = hub.events(event_id="DEFER", recipients=["carol@partner.example"])
    (received,) = server.messages
    assert received.rcpt_tos == ["carol@partner.example"]
    assert b"via the fake server" in received.data
    assert any("451 4.3.2 try again later" in s for e in deferred
               for s in e["recipient-status"])
    assert server.handler.commands.count("RCPT") == 2


def test_address_of_unwraps_imcea_recipients_of_the_default_domain() -> None:
    """An agent for TICKET:* is handed IMCEATICKET-support@contoso.test; address_of gives
    back TICKET:support. SMTP recipients, and IMCEA forms in other domains (routed as SMTP),
    stay SMTP."""
    mail = item(1, 4)
    for r, address in zip(mail.recipients, ["IMCEATICKET-support@Contoso.test",
                                            "IMCEASMS-+2B15551234@contoso.test",
                                            "bob@agent.test",
                                            "IMCEAFAX-+2B1555@fabrikam.test"]):
        r.address = address
    mail.default_domain = "contoso.test"
    got = [mail.address_of(r) for r in mail.recipients]
    assert [(a.address_type, a.address, a.proxy_address, a.is_smtp) for a in got] == [
        ("TICKET", "support", "TICKET:support", False),
        ("SMS", "+15551234", "SMS:+15551234", False),
        ("SMTP", "bob@agent.test", "SMTP:bob@agent.test", True),
        ("SMTP", "IMCEAFAX-+2B1555@fabrikam.test", "SMTP:IMCEAFAX-+2B1555@fabrikam.test", True),
    ]
    assert got[1].smtp_address == "IMCEASMS-+2B15551234@contoso.test"
    # without a default domain (an item built by hand) any IMCEA address is unwrapped
    assert recipient_address("IMCEAFAX-+2B1555@fabrikam.test").proxy_address == "FAX:+1555"
    # not decodable (invalid UTF-8): left as the SMTP address it is
    assert recipient_address("IMCEAX-+C3@contoso.test", "contoso.test").is_smtp


def test_a_maildir_half_made_by_another_process_is_completed_not_refused(tmp_path: Path) -> None:
    """Two workers (or two servers sharing a mailbox folder) deliver a mailbox's first
    messages at the same moment: one finds the Maildir's root made by the other but not yet
    its ``new``. That is not an error (it was ``451 File exists`` and a minute's retry)."""
    from hubport.agents.maildir import ensure_maildir

    root = tmp_path / "mailboxes" / "Bob"
    root.mkdir(parents=True)  # the other process is between its mkdir(root) and mkdir(new)
    ensure_maildir(root)
    assert all((root / sub).is_dir() for sub in ("tmp", "new", "cur"))
    ensure_maildir(root)  # and again: nothing to do
    done = subprocess.run(  # two processes racing from nothing, many times over
        [sys.executable, "-c", RACE, str(tmp_path / "race")], capture_output=True, text=True,
        timeout=120, check=False)
    assert done.returncode == 0, done.stderr


RACE = """
import multiprocessing, sys
from pathlib import Path
from hubport.agents.maildir import ensure_maildir

def make(root):
    ensure_maildir(Path(root))

if __name__ == "__main__":
    base = Path(sys.argv[1])
    ctx = multiprocessing.get_context("fork")
    for n in range(200):
        procs = [ctx.Process(target=make, args=(str(base / str(n)),)) for _ in range(2)]
        for p in procs: p.start()
        for p in procs: p.join()
        assert all(p.exitcode == 0 for p in procs), n
"""
