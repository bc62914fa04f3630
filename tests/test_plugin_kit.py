"""The test kit shipped to plugin authors (``hubport.plugins.pytest_plugin``, docs/agents.md "Testing
it"): ``plugins=`` taking module names or module objects, a plugin named twice, an isolated
hub, the documented ``hub.events``, and waits whose timeouts say what they last saw.

An "installed" plugin here is a real distribution as ``importlib.metadata`` finds one: a
``.dist-info`` with a ``hubport`` entry point in a folder put on ``sys.path`` for the test.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import signal
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import hubport.plugins.foreign
import hubport.plugins.pytest_plugin as kit
from hubport.core.agent_runner import AGENT_TIMEOUT
from hubport.core.api import DeferQueue, DeliveryAgent, FolderWriter, ItemResult, MailItem
from hubport.core.config_fields import ConfigErrors
from hubport.core.hooks import Hooks, PluginError
from hubport.core.model import NextHop, SmtpResponse
from hubport.plugins.pytest_plugin import Hub, message, wait_for, wait_for_sync, wait_for_value

ROOT = Path(__file__).resolve().parents[1]

AGENT = '''
from hubport.core.api import DeliveryAgent, ItemResult
from hubport.core import hookimpl
from hubport.core.model import SmtpResponse

class KitAgent(DeliveryAgent):
    async def deliver(self, item):
        return ItemResult.success(item, SmtpResponse(250, "2.0.0", "kit agent took it"))

@hookimpl
def register_delivery_agents(register):
    register("KIT", KitAgent)
'''

CONNECTOR = '''
[[delivery_agent_connector]]
Name = "Kit"
AddressSpaces = ["SMTP:kit.test;1"]
DeliveryProtocol = "KIT"
'''


def agent_module(name: str = "kit_agent_object") -> types.ModuleType:
    """A plugin module built in the test: an object only, in no ``sys.modules`` entry."""
    module = types.ModuleType(name)
    exec(compile(AGENT, f"<{name}>", "exec"), module.__dict__)
    return module


def registered(hub: Hub, module: types.ModuleType) -> list[str]:
    """The names ``module`` is registered under in the hub's plugin manager."""
    return [n for n, p in hub.daemon.hooks.pm.list_name_plugin() if p is module]


async def delivered_by_kit(hub: Hub) -> None:
    hub.drop_replay("alice@contoso.test", ["someone@kit.test"], message(subject="kit"))
    [event] = await wait_for(lambda: hub.events(event_id="DELIVER", source="AGENT"),
                             timeout=30, describe=hub.event_ids)
    assert event["recipient-status"] == ["250 2.0.0 kit agent took it"]


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An installed plugin distribution (entry point ``kitplug`` -> module ``kit_installed``),
    registering the KIT agent; removed from ``sys.path`` and ``sys.modules`` after the test."""
    site = tmp_path / "site"
    dist = site / "kit_installed_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kit-installed-plugin\n"
                                   "Version: 1.0\n")
    (dist / "entry_points.txt").write_text("[hubport]\nkitplug = kit_installed\n")
    (site / "kit_installed.py").write_text(AGENT)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "kit_installed", raising=False)
    return "kit_installed"


# -- plugins= takes module objects -------------------------------------------------------------


@pytest.mark.parametrize("form", ["tuple", "single"])
async def test_plugins_takes_a_module_object(hubport_hub_factory: Any, form: str) -> None:
    module = agent_module()
    assert "kit_agent_object" not in sys.modules
    plugins: Any = (module,) if form == "tuple" else module
    async with hubport_hub_factory(extra=CONNECTOR, plugins=plugins) as hub:
        assert registered(hub, module) == ["kit_agent_object"]
        await delivered_by_kit(hub)


def test_plugins_refuses_what_is_neither_a_name_nor_a_module(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"module names or module objects, not 42"):
        kit._plugin_modules(("hubport.plugins.foreign", 42))  # type: ignore[arg-type]
    with pytest.raises(PluginError, match=r"dotted module path or a module object, not 42"):
        Hooks((42,), entry_points=False)  # type: ignore[arg-type]


async def test_a_bad_plugins_entry_fails_before_a_daemon_starts(
        hubport_hub_factory: Any) -> None:
    with pytest.raises(TypeError, match=r"not <object object"):
        async with hubport_hub_factory(plugins=[object()]):
            raise AssertionError("the hub must not start")


def test_an_installed_plugin_that_does_not_import_is_named_with_its_distribution(
        installed: str, tmp_path: Path) -> None:
    (tmp_path / "site" / "kit_installed.py").write_text("import no_such_module_anywhere\n")
    with pytest.raises(PluginError, match=r"^cannot load installed plugin 'kitplug' "
                       r"\(kit_installed, from kit-installed-plugin 1\.0\): "
                       r"No module named 'no_such_module_anywhere'"):
        Hooks()


# -- a plugin named although installed already --------------------------------------------------


def test_naming_a_builtin_again_registers_it_once() -> None:
    for again in ("hubport.plugins.foreign", hubport.plugins.foreign, "hubport.plugins.foreign"):
        hooks = Hooks((again, again), entry_points=False)
        names = [n for n, p in hooks.pm.list_name_plugin() if p is hubport.plugins.foreign]
        assert names == ["foreign"], names


def test_a_different_module_under_a_taken_name_is_a_clear_error() -> None:
    hooks = Hooks(entry_points=False)
    hooks.register_module("hubport.plugins.foreign", name="elsewhere")  # the same module: a no-op
    with pytest.raises(PluginError, match=r"^cannot register plugin module 'foreign' as "
                       r"'foreign': that name is taken by <module 'hubport\.plugins\.foreign'"):
        hooks.register_module(agent_module("foreign"))  # another module, a built-in's name
    assert not hooks.pm.has_plugin("elsewhere")


async def test_naming_an_installed_plugin_in_plugins_registers_it_once(
        hubport_hub_factory: Any, installed: str) -> None:
    async with hubport_hub_factory(extra=CONNECTOR, plugins=(installed,)) as hub:
        module = sys.modules[installed]
        assert registered(hub, module) == ["kitplug"]  # under its entry-point name only
        await delivered_by_kit(hub)


async def test_naming_an_installed_plugin_in_the_organization_registers_it_once(
        hubport_hub_factory: Any, installed: str) -> None:
    extra = f'[hubport]\nPlugins = ["{installed}"]\n{CONNECTOR}'
    async with hubport_hub_factory(extra=extra) as hub:
        assert registered(hub, sys.modules[installed]) == ["kitplug"]


# -- isolated=True ---------------------------------------------------------------------------


async def test_isolated_hub_loads_no_installed_plugin(hubport_hub_factory: Any,
                                                      installed: str) -> None:
    async with hubport_hub_factory(isolated=True) as hub:
        hooks = hub.daemon.hooks
        assert not hooks.pm.has_plugin("kitplug")
        assert "KIT" not in hooks.registry.delivery_agents
        names = {n for n, _ in hooks.pm.list_name_plugin()}
        assert names == {"foreign", "send", "receive", "mailbox", "builtin-agents",
                         "delivery-agent"}


async def test_isolated_hub_loads_the_plugins_it_names(hubport_hub_factory: Any,
                                                       installed: str) -> None:
    async with hubport_hub_factory(extra=CONNECTOR, isolated=True,
                                   plugins=(installed,)) as hub:
        hooks = hub.daemon.hooks
        assert not hooks.pm.has_plugin("kitplug")
        assert registered(hub, sys.modules[installed]) == [installed]
        await delivered_by_kit(hub)


async def test_a_hub_that_is_not_isolated_loads_installed_plugins(
        hubport_hub_factory: Any, installed: str) -> None:
    """The counterpart of the isolated test: the installed plugin is found at all."""
    async with hubport_hub_factory(extra=CONNECTOR) as hub:
        assert hub.daemon.hooks.pm.has_plugin("kitplug")
        await delivered_by_kit(hub)


# -- hub.events is documented ----------------------------------------------------------------


def test_every_hub_helper_has_a_docstring_and_is_in_the_testing_docs() -> None:
    testing = (ROOT / "docs" / "agents.md").read_text().split("## Testing it", 1)[1]
    helpers = [name for name, member in inspect.getmembers(Hub)
               if not name.startswith("_") and (inspect.isfunction(member) or
                                                isinstance(member, property))]
    assert {"events", "event_ids", "drop_replay", "maildir"} <= set(helpers)
    for name in helpers:
        assert inspect.getdoc(getattr(Hub, name)), f"Hub.{name} has no docstring"
        assert f"hub.{name}" in testing, f"hub.{name} is not in docs/agents.md 'Testing it'"
    doc = inspect.getdoc(Hub.events) or ""
    for word in ("event_id", "source", "recipients", "recipient-status"):
        assert word in doc, word
    for word in ("isolated=True", "wait_for_value", "describe="):
        assert word in testing, word


def test_the_fault_and_harness_fixtures_are_documented() -> None:
    testing = (ROOT / "docs" / "agents.md").read_text().split("## Testing it", 1)[1]
    for name in ("hubport_agent_harness", "hubport_unwritable_folder", "hubport_hub_process"):
        assert callable(getattr(kit, name)), name
        assert name in testing and name in (kit.__doc__ or ""), name
    for cls in (kit.AgentHarness, kit.AgentRun, kit.HubProcess, kit.UnwritableFolders):
        for name, member in inspect.getmembers(cls):
            if name.startswith("_") or not (inspect.isfunction(member) or
                                            isinstance(member, property)):
                continue
            assert inspect.getdoc(member), f"{cls.__name__}.{name} has no docstring"
    for used in ("harness.item(", "harness.run(", "run.statuses()", "run.outcome",
                 "harness.intents", ".make(path)", ".restore(path)", "proc.start(failpoints=",
                 "proc.wait_exit()", "proc.restart()", "proc.hub", "mail_item"):
        assert used in testing, used


# -- waits that say what they last saw ---------------------------------------------------------


def test_wait_for_sync_timeout_reports_the_last_value_and_describe() -> None:
    with pytest.raises(AssertionError) as caught:
        wait_for_sync(lambda: [], timeout=0.1, interval=0.01)
    assert str(caught.value) == "condition not met within 0.1s; the condition last returned []"

    calls = iter(range(1000))
    with pytest.raises(AssertionError) as caught:
        wait_for_sync(lambda: 0 * next(calls), timeout=0.1, interval=0.01,
                      what="the queue to drain", describe=lambda: "queue depth 3")
    text = str(caught.value)
    assert text.startswith("the queue to drain not met within 0.1s")
    assert text.endswith("; last seen: queue depth 3")

    with pytest.raises(AssertionError, match=r"last seen: <describe\(\) raised "
                       r"RuntimeError\('gone'\)>"):
        wait_for_sync(lambda: None, timeout=0.05, interval=0.01,
                      describe=lambda: (_ for _ in ()).throw(RuntimeError("gone")))


async def test_wait_for_timeout_reports_what_describe_saw_and_keeps_the_old_call() -> None:
    state = {"events": ["RECEIVE"]}
    with pytest.raises(AssertionError) as caught:
        await wait_for(lambda: "DELIVER" in state["events"], 0.1, 0.01,
                       describe=lambda: state["events"])
    assert str(caught.value) == "condition not met within 0.1s; last seen: ['RECEIVE']"
    # the positional form and the truthy value returned are as before
    state["events"].append("DELIVER")
    assert await wait_for(lambda: state["events"][-1:], 1.0, 0.01) == ["DELIVER"]
    assert wait_for_sync(lambda: 7) == 7


async def test_wait_for_value_names_what_and_the_value_last_read() -> None:
    reads = iter(range(10**6))
    with pytest.raises(AssertionError) as caught:
        await wait_for_value(lambda: next(reads) % 1 + 1, lambda n: n > 5, "five deliveries",
                             timeout=0.1)
    assert str(caught.value) == "five deliveries not met within 0.1s; last seen: 1"
    assert await wait_for_value(lambda: 6, lambda n: n > 5, "six") == 6


def test_tests_support_reexports_the_kits_waits() -> None:
    import support as support

    assert support.wait_for_value is wait_for_value and support.wait_for is wait_for
    assert not re.search(r"(?m)^(async )?def wait_for", inspect.getsource(support))


# -- one agent without a hub: hubport_agent_harness, mail_item, AgentRun ---------------------


class SpoolAgent(DeliveryAgent):
    """Writes one file per item into its ``Spool`` folder with ``FolderWriter``; refuses
    addresses whose local part is ``nobody``; logs the connection's calls."""

    calls: list[str] = []

    @classmethod
    def read_settings(cls, reader: Any) -> Path:
        return reader.path("Spool", "spool")

    async def open(self, next_hop: NextHop) -> None:
        SpoolAgent.calls.append(f"open {next_hop.domain}")

    async def deliver(self, item: MailItem) -> ItemResult:
        SpoolAgent.calls.append(f"deliver {item.message.id}")
        result = ItemResult()
        good = [r for r in item.recipients if not r.address.startswith("nobody@")]
        for r in item.recipients:
            if r not in good:
                result.ack_fail(r, SmtpResponse(550, "5.1.1", "no such spool user"))
        writer = FolderWriter(self.context, self.settings, "Spool")
        writer.add(result, good, f"{self.context.store_id}-{item.message.id}.txt", item.data)
        await writer.commit()
        return result

    async def close(self) -> None:
        SpoolAgent.calls.append("close")


class HangingAgent(DeliveryAgent):
    closed = 0

    async def deliver(self, item: MailItem) -> ItemResult:
        if item.message.id == 2:
            await asyncio.sleep(3600)
        return ItemResult.success(item)

    async def close(self) -> None:
        HangingAgent.closed += 1


class ClosedAgent(DeliveryAgent):
    async def open(self, next_hop: NextHop) -> DeferQueue:
        return DeferQueue(SmtpResponse(421, "4.4.2", "gateway down"), retry_in=30)

    async def deliver(self, item: MailItem) -> ItemResult:
        raise AssertionError("deliver after a DeferQueue")


@pytest.fixture(autouse=True)
def _reset_agents() -> None:
    SpoolAgent.calls = []
    HangingAgent.closed = 0


async def test_harness_runs_open_deliver_close_with_settings_and_folder_writes(
        hubport_agent_harness: Any, tmp_path: Path) -> None:
    harness = hubport_agent_harness(SpoolAgent, {"Spool": "out"})
    assert harness.settings == tmp_path / "out"  # read_settings, relative to tmp_path
    (tmp_path / "out").mkdir()
    first = harness.item(recipients=["a@agent.test", "nobody@agent.test"])
    second = harness.item("bob@contoso.test", ["b@agent.test"], b"Subject: two\r\n\r\nhi\r\n")
    run = await harness.run([first, second])
    assert SpoolAgent.calls == ["open agent.test", "deliver 1", "deliver 2", "close"]
    assert run.statuses() == {
        "a@agent.test": "delivered 250 2.0.0 Written as kitstore-1.txt",
        "nobody@agent.test": "failed 550 5.1.1 no such spool user",
        "b@agent.test": "delivered 250 2.0.0 Written as kitstore-2.txt"}
    assert [r.detail for r in run.results] == ["kitstore-1.txt", "kitstore-2.txt"]
    assert run.intents == {100: "kitstore-1.txt", 200: "kitstore-2.txt"}
    assert (tmp_path / "out" / "kitstore-2.txt").read_bytes() == b"Subject: two\r\n\r\nhi\r\n"
    assert harness.context.server.name == "HUB01"
    assert harness.context.directory.default_domain == "contoso.test"


async def test_harness_recovers_a_recorded_write_instead_of_writing_again(
        hubport_agent_harness: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_bytes(b"written before the crash")
    harness = hubport_agent_harness(SpoolAgent, {"Spool": str(out)})
    run = await harness.run(harness.item(recipients=["a@agent.test"],
                                         drop_intents={"a@agent.test": "earlier.txt"}))
    assert run.statuses() == {"a@agent.test": "delivered 250 2.0.0 Written as earlier.txt"}
    assert sorted(p.name for p in out.iterdir()) == ["earlier.txt"]


async def test_harness_applies_connection_timeout_and_connection_split(
        hubport_agent_harness: Any) -> None:
    harness = hubport_agent_harness(HangingAgent, {"ConnectionTimeout": "1s",
                                                   "MaxMessagesPerConnection": 2})
    run = await harness.run([harness.item() for _ in range(3)])
    assert [next(iter(r.recipients.values())).kind for r in run.results] == \
        ["delivered", "deferred", "delivered"]
    assert str(next(iter(run.results[1].recipients.values())).response) == str(AGENT_TIMEOUT)
    assert HangingAgent.closed == 2  # two connections (2 + 1 items), each closed


async def test_harness_reports_a_queue_level_answer_and_refuses_bad_fields(
        hubport_agent_harness: Any) -> None:
    run = await hubport_agent_harness(ClosedAgent).run([hubport_agent_harness(
        ClosedAgent).item()])
    assert run.outcome == DeferQueue(SmtpResponse(421, "4.4.2", "gateway down"), retry_in=30)
    with pytest.raises(AssertionError, match="whole queue: DeferQueue"):
        run.results  # noqa: B018
    # statuses() shows the whole-queue answer on every recipient, as the transport applies it
    assert run.statuses() == {"someone@agent.test": "deferred 421 4.4.2 gateway down"}
    with pytest.raises(ConfigErrors, match="Nonsense"):
        hubport_agent_harness(SpoolAgent, {"Nonsense": 1})
    with pytest.raises(TypeError, match="connector field Spool"):
        hubport_agent_harness(SpoolAgent, {"Spool": {"a": 1}})


def test_mail_item_builds_what_deliver_is_handed() -> None:
    item = kit.mail_item("carol@contoso.test", ["x@agent.test", "IMCEASMS-+2B1555@contoso.test"],
                         message_id=7, recipient_ids=[70, 71])
    assert [(r.id, r.message_id, r.address) for r in item.recipients] == [
        (70, 7, "x@agent.test"), (71, 7, "IMCEASMS-+2B1555@contoso.test")]
    assert item.message.mail_from.address == "carol@contoso.test"
    assert b"To: x@agent.test" in item.data and item.message.subject == "hello"
    assert item.message.message_id == "<kit-7@kit.test>"  # the data has no Message-ID
    # with one, the item carries it as the queue would
    headed = kit.mail_item(data=kit.message(message_id="<abc@example.test>", subject="s"))
    assert (headed.message.message_id, headed.message.subject) == ("<abc@example.test>", "s")
    assert item.address_of(item.recipients[1]).proxy_address == "SMS:+1555"
    assert [e.address for e in item.envelope.recipients] == [r.address for r in item.recipients]
    with pytest.raises(TypeError, match="list of addresses"):
        kit.mail_item(recipients="x@agent.test")
    with pytest.raises(ValueError, match="2 recipients but 1 recipient_ids"):
        kit.mail_item(recipients=["a@x.test", "b@x.test"], recipient_ids=[1])


# -- faults: an unwritable folder, a hub killed at a failpoint -------------------------------


async def test_unwritable_folder_defers_folder_writes_until_restored(
        hubport_agent_harness: Any, hubport_unwritable_folder: Any, tmp_path: Path) -> None:
    out = hubport_unwritable_folder.make(tmp_path / "out")
    with pytest.raises(OSError):
        (out / "probe").write_bytes(b"x")
    harness = hubport_agent_harness(SpoolAgent, {"Spool": str(out)})
    run = await harness.run(harness.item(recipients=["a@agent.test"]))
    [status] = run.statuses().values()
    assert status.startswith("deferred 4") and "Spool" in status, status
    assert list(out.iterdir()) == []  # nothing left behind, not even a temp
    hubport_unwritable_folder.restore(out)
    run = await harness.run(harness.item(recipients=["a@agent.test"]))
    assert run.statuses() == {"a@agent.test": "delivered 250 2.0.0 Written as kitstore-2.txt"}


def test_unwritable_folder_is_restored_at_teardown(tmp_path: Path) -> None:
    folders = kit.UnwritableFolders()
    try:
        out = folders.make(tmp_path / "out")
        with pytest.raises(OSError):
            (out / "probe").write_bytes(b"x")
    finally:
        folders.restore_all()
    (out / "probe").write_bytes(b"x")  # writable again, the mount (if any) gone
    with open("/proc/self/mounts") as mounts:
        assert str(out) not in mounts.read()


PROCESS_AGENT = '''
import os
from hubport.core.api import DeliveryAgent, ItemResult
from hubport.core import hookimpl

class CountingAgent(DeliveryAgent):
    """Appends one line per delivery to deliveries.txt beside the organization file."""
    async def deliver(self, item):
        with open(os.path.join(os.path.dirname(__file__), "deliveries.txt"), "a") as out:
            out.write(item.message.subject + "\\n")
        return ItemResult.success(item)

@hookimpl
def register_delivery_agents(register):
    register("COUNTING", CountingAgent)
'''


def test_hub_process_killed_after_the_agent_delivers_redelivers_on_restart(
        hubport_hub_process: Any, tmp_path: Path) -> None:
    (tmp_path / "kit_counting_agent.py").write_text(PROCESS_AGENT)
    extra = ('[[delivery_agent_connector]]\nName = "Counting"\n'
             'AddressSpaces = ["SMTP:count.test;1"]\nDeliveryProtocol = "COUNTING"\n\n'
             '[hubport]\nPlugins = ["kit_counting_agent"]\n')
    proc = hubport_hub_process(extra=extra)
    proc.start(failpoints="after_agent_before_commit:kill")
    proc.hub.drop_replay("alice@contoso.test", ["x@count.test"], message(subject="once"))
    assert proc.wait_exit() == -signal.SIGKILL
    deliveries = tmp_path / "deliveries.txt"
    assert deliveries.read_text() == "once\n"  # the agent delivered; the queue never knew
    assert "DELIVER" not in proc.hub.event_ids()
    proc.restart()
    wait_for_sync(lambda: proc.hub.events(event_id="DELIVER", source="AGENT"), timeout=30,
                  describe=proc.hub.event_ids, what="the DELIVER after the restart")
    assert deliveries.read_text() == "once\nonce\n"  # at least once: offered again
    assert proc.stop() == 0
