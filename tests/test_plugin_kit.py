"""The test kit shipped to plugin authors (``plugins.pytest_plugin``, docs/agents.md "Testing
it"): ``plugins=`` taking module names or module objects, a plugin named twice, an isolated
hub, the documented ``hub.events``, and waits whose timeouts say what they last saw.

An "installed" plugin here is a real distribution as ``importlib.metadata`` finds one: a
``.dist-info`` with a ``hubport`` entry point in a folder put on ``sys.path`` for the test.
"""

from __future__ import annotations

import inspect
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import plugins.foreign
import plugins.pytest_plugin as kit
from core.hooks import Hooks, PluginError
from plugins.pytest_plugin import Hub, message, wait_for, wait_for_sync, wait_for_value

ROOT = Path(__file__).resolve().parents[1]

AGENT = '''
from agents.api import DeliveryAgent, ItemResult
from core import hookimpl
from core.model import SmtpResponse

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
        kit._plugin_modules(("plugins.foreign", 42))  # type: ignore[arg-type]
    with pytest.raises(PluginError, match=r"dotted module path or a module object, not 42"):
        Hooks((42,), entry_points=False)  # type: ignore[arg-type]


async def test_a_bad_plugins_entry_fails_before_a_daemon_starts(
        hubport_hub_factory: Any) -> None:
    with pytest.raises(TypeError, match=r"not <object object"):
        async with hubport_hub_factory(plugins=[object()]):
            raise AssertionError("the hub must not start")


# -- a plugin named although installed already --------------------------------------------------


def test_naming_a_builtin_again_registers_it_once() -> None:
    for again in ("plugins.foreign", plugins.foreign, "plugins.foreign"):
        hooks = Hooks((again, again), entry_points=False)
        names = [n for n, p in hooks.pm.list_name_plugin() if p is plugins.foreign]
        assert names == ["foreign"], names


def test_a_different_module_under_a_taken_name_is_a_clear_error() -> None:
    hooks = Hooks(entry_points=False)
    hooks.register_module("plugins.foreign", name="elsewhere")  # the same module: a no-op
    with pytest.raises(PluginError, match=r"^cannot register plugin module 'foreign' as "
                       r"'foreign': that name is taken by <module 'plugins\.foreign'"):
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
    import tests.support as support

    assert support.wait_for_value is wait_for_value and support.wait_for is wait_for
    assert not re.search(r"(?m)^(async )?def wait_for", inspect.getsource(support))
