"""The plugin system: discovery, ``hubport plugins``, validation, async hooks and tracing."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import time
import types
import warnings
from collections.abc import Callable
from email import message_from_bytes
from pathlib import Path
from typing import Any, ClassVar

import pluggy
import pytest
from structlog.testing import capture_logs

from hubport.core import hookimpl
from hubport.core.config import load_organization
from hubport.core.config_fields import ConfigContext, ConfigError, FieldReader
from hubport.core.connectors import Connector
from hubport.core.hooks import Hooks, HookTimeout, PluginError
from hubport.core.model import (
    Envelope,
    EnvelopeRecipient,
    MailFrom,
    NextHop,
    SmtpResponse,
    Submission,
)
from support import drop_in, event_ids, maildir, message, wait_for, write_org

TESTS = Path(__file__).resolve().parent  # the helper modules (support.py ...)
BUILTINS = ["foreign", "send", "receive", "mailbox", "builtin-agents", "delivery-agent"]
DELIVER_ORDER = ["delivery-agent", "mailbox", "send", "foreign"]


def hubport(*args: str, cwd: Path, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=60, check=False)


def plugin_module(monkeypatch: pytest.MonkeyPatch, name: str, **attrs: Any) -> str:
    """A plugin module that exists only in ``sys.modules`` for this test."""
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return name


# -- hubport plugins --------------------------------------------------------------------------


def test_plugins_command_lists_builtins_hooks_and_call_order(tmp_path: Path) -> None:
    done = hubport("-m", "hubport.core.cli", "plugins", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    listed = [line.split()[0] for line in lines[1:] if line.startswith("  ")
              and not line.strip().startswith("hooks:")]
    assert listed[:len(BUILTINS)] == BUILTINS  # discovery order
    text = done.stdout
    assert "hubport.plugins.foreign" in text and "hubport.plugins.mailbox" in text and "hubport.agents.builtin" in text
    assert "hooks: deliver, register_connector_types" in text
    assert "hooks: register_delivery_agents" in text
    order = {line.split()[0]: line.split(None, 1)[1] for line in
             text.split("Hook call order")[1].splitlines()[1:] if line.startswith("  ")}
    assert order["deliver"] == " -> ".join(DELIVER_ORDER)  # last registered is called first
    assert order["register_connector_types"] == "delivery-agent -> receive -> send -> foreign"
    assert ("Connector types: delivery_agent_connector, foreign_connector, receive_connector,"
            " routing_group_connector, send_connector") in text
    assert "Delivery agents: COMMAND, DROP, HTTP, MAILDIR" in text
    assert not list(tmp_path.iterdir())  # listing plugins touches no folders


def test_plugins_command_json(tmp_path: Path) -> None:
    done = hubport("-m", "hubport.core.cli", "plugins", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    plugins = {p["name"]: p for p in data["plugins"]}
    assert [p["name"] for p in data["plugins"]][:len(BUILTINS)] == BUILTINS
    assert plugins["foreign"] == {"name": "foreign", "module": "hubport.plugins.foreign",
                                  "version": "built-in",
                                  "hooks": ["deliver", "register_connector_types"]}
    assert plugins["mailbox"]["hooks"] == ["deliver"]
    assert plugins["builtin-agents"]["hooks"] == ["register_delivery_agents"]
    assert data["call_order"]["deliver"] == DELIVER_ORDER
    assert data["call_order"]["register_delivery_agents"][-1] == "builtin-agents"


def test_call_order_follows_registration_and_tryfirst_trylast(
        monkeypatch: pytest.MonkeyPatch) -> None:
    @hookimpl
    def deliver(next_hop: Any, connector: Any, items: Any, context: Any) -> None:
        return None

    @hookimpl(trylast=True)
    def on_submitted(message: Any) -> None:
        return None

    late = plugin_module(monkeypatch, "hubport_test_late", deliver=deliver)
    last = plugin_module(monkeypatch, "hubport_test_last", on_submitted=on_submitted)
    early = plugin_module(monkeypatch, "hubport_test_early", on_submitted=hookimpl(
        tryfirst=True)(lambda message: None))
    hooks = Hooks([late, last, early], entry_points=False)
    [description] = hooks.describe()
    assert [p["name"] for p in description["plugins"]] == [*BUILTINS, late, last, early]
    assert description["call_order"]["deliver"] == [late, *DELIVER_ORDER]
    assert description["call_order"]["on_submitted"] == [early, last]


# -- validation -------------------------------------------------------------------------------


def test_misspelt_plugin_module_is_a_clear_plugin_error() -> None:
    with pytest.raises(PluginError, match=r"cannot import plugin module 'a\.misspelt\.module'"):
        Hooks(extra_modules=["a.misspelt.module"], entry_points=False)


def test_plugin_module_that_fails_to_import_names_itself(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    (tmp_path / "hubport_test_broken.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"hubport_test_broken.*boom at import"):
        Hooks(extra_modules=["hubport_test_broken"], entry_points=False)
    sys.modules.pop("hubport_test_broken", None)


def test_misspelt_hook_name_fails_at_check_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    @hookimpl
    def recieve(submission: Any) -> None:
        return None

    name = plugin_module(monkeypatch, "hubport_test_typo", recieve=recieve)
    with pytest.raises(pluggy.PluginValidationError, match="recieve"):
        Hooks(extra_modules=[name], entry_points=False)

    class Typo:
        @hookimpl
        def on_categorised(self, message: Any, recipients: Any) -> None:
            return None

    hooks = Hooks(entry_points=False)
    with pytest.raises(pluggy.PluginValidationError, match="on_categorised"):
        hooks.register(Typo())


def test_hook_with_wrong_argument_names_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class Wrong:
        @hookimpl
        def receive(self, submission: Any, extra_argument: Any) -> None:
            return None

    with pytest.raises(pluggy.PluginValidationError, match="extra_argument"):
        Hooks(entry_points=False).register(Wrong())


def connector_type(section: str, label: str) -> type:
    class _Type(Connector):
        delivery_type: ClassVar[str] = "DeliveryAgent"

        @classmethod
        def from_config(cls, reader: FieldReader, ctx: ConfigContext) -> Connector:
            return cls(**cls.read_common(reader, ctx))

    _Type.section = section  # type: ignore[misc]
    _Type.__name__ = label
    return _Type


def registering(cls: type) -> Callable[..., None]:
    @hookimpl
    def register_connector_types(register: Callable[[type], None]) -> None:
        register(cls)

    return register_connector_types


def test_two_connector_types_claiming_one_section_is_a_plugin_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    one = plugin_module(monkeypatch, "hubport_test_one", register_connector_types=registering(
        connector_type("lab_connector", "One")))
    two = plugin_module(monkeypatch, "hubport_test_two", register_connector_types=registering(
        connector_type("lab_connector", "Two")))
    assert "lab_connector" in Hooks([one], entry_points=False).registry.connector_types
    with pytest.raises(PluginError, match=r"two connector types claim section \[\[lab_connector\]\]"):
        Hooks([one, two], entry_points=False)
    # a built-in section cannot be taken over either
    thief = plugin_module(monkeypatch, "hubport_test_thief", register_connector_types=registering(
        connector_type("foreign_connector", "Thief")))
    with pytest.raises(PluginError, match="foreign_connector"):
        Hooks([thief], entry_points=False)


def test_registering_something_that_is_not_a_connector_type_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    name = plugin_module(monkeypatch, "hubport_test_notype",
                         register_connector_types=registering(dict))
    with pytest.raises(PluginError, match="not a connector type"):
        Hooks([name], entry_points=False)


def test_two_delivery_agents_claiming_one_protocol_is_a_plugin_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    @hookimpl
    def register_delivery_agents(register: Callable[[str, type], None]) -> None:
        register("maildir", object)

    name = plugin_module(monkeypatch, "hubport_test_agent",
                         register_delivery_agents=register_delivery_agents)
    with pytest.raises(PluginError, match=r"MAILDIR|maildir"):
        Hooks([name], entry_points=False)


# -- async hooks --------------------------------------------------------------------------


def submission(subject: str = "s") -> Submission:
    return Submission(Envelope(MailFrom("alice@contoso.test"),
                               [EnvelopeRecipient("bob@contoso.test")]),
                      message(subject=subject), "PICKUP", subject=subject)


class Answers:
    """``receive`` plugins: one plain, one async, each answering as told."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls = 0


class SyncReceive(Answers):
    @hookimpl
    def receive(self, submission: Submission) -> Any:
        self.calls += 1
        return self.answer


class AsyncReceive(Answers):
    @hookimpl
    async def receive(self, submission: Submission) -> Any:
        self.calls += 1
        return self.answer


REJECT = SmtpResponse(550, "5.7.1", "Refused by a test agent")


async def test_call_first_awaits_async_results_and_first_non_none_wins() -> None:
    hooks = Hooks(entry_points=False)
    quiet, loud = AsyncReceive(None), AsyncReceive(REJECT)
    hooks.register(loud, name="loud")
    hooks.register(quiet, name="quiet")  # registered last: called first, says nothing
    assert await hooks.call_first("receive", submission=submission()) == REJECT
    assert (quiet.calls, loud.calls) == (1, 1)
    # a plain implementation called before an async one decides; the coroutine is closed
    hooks.register(SyncReceive(SmtpResponse(451, "4.7.0", "later")), name="sync")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answer = await hooks.call_first("receive", submission=submission())
        gc.collect()
    assert answer == SmtpResponse(451, "4.7.0", "later")
    assert not [w for w in caught if "never awaited" in str(w.message)]
    assert await hooks.call_all("on_submitted", message=None) == []


@pytest.mark.parametrize("deciding", [SyncReceive, AsyncReceive])
@pytest.mark.parametrize("later", [SyncReceive, AsyncReceive])
async def test_call_first_calls_nothing_after_the_deciding_implementation(
        deciding: type[Answers], later: type[Answers]) -> None:
    """pluggy's firstresult: an implementation after the one that decided is never called,
    whether either is a plain function or a coroutine."""
    hooks = Hooks(entry_points=False)
    second = later(SmtpResponse(451, "4.7.0", "never asked"))
    first = deciding(REJECT)
    hooks.register(second, name="second")
    hooks.register(first, name="first")  # registered last: called first
    assert await hooks.call_first("receive", submission=submission()) == REJECT
    assert (first.calls, second.calls) == (1, 0)


def test_a_wrapper_on_a_first_result_hook_is_refused_at_registration() -> None:
    class Wraps:
        @hookimpl(wrapper=True)
        def receive(self, submission: Submission) -> Any:
            return (yield)

    hooks = Hooks(entry_points=False)
    with pytest.raises(PluginError, match=r"'wraps'.*'receive' is first result"):
        hooks.register(Wraps(), name="wraps")
    assert not hooks.pm.has_plugin("wraps")


async def test_a_raising_async_implementation_leaves_no_coroutine_unawaited() -> None:
    class Raises:
        @hookimpl
        async def deliver(self, next_hop: Any, connector: Any, items: Any, context: Any) -> Any:
            raise RuntimeError("agent bug")

    hooks = Hooks(entry_points=False)  # mailbox and foreign implement deliver with async def
    hooks.register(Raises())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="agent bug"):
            await hooks.call_first("deliver", next_hop=NextHop("X", "y", ""), connector=None,
                                   items=[], context=None)
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]


class Gatekeeper:
    """An async ``receive`` agent: rejects 'reject me', defers 'hold me' twice."""

    def __init__(self) -> None:
        self.held = 0

    @hookimpl
    async def receive(self, submission: Submission) -> SmtpResponse | None:
        if submission.subject == "reject me":
            return REJECT
        if submission.subject == "hold me" and self.held < 2:
            self.held += 1
            return SmtpResponse(451, "4.7.0", "Try again later")
        return None


class CategorizerEvents:
    """Records the categorizer's stage hooks and events of one message, in call order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def categorize(self, message: Any, recipient: Any, organization: Any) -> None:
        self.calls.append("categorize " + recipient.address)

    @hookimpl
    def route(self, message: Any, recipient: Any, organization: Any, server: str) -> None:
        self.calls.append("route " + recipient.address)

    @hookimpl
    def on_resolved(self, message: Any, recipients: list) -> None:
        self.calls.append("on_resolved")

    @hookimpl
    async def on_routed(self, message: Any, recipients: list) -> None:
        self.calls.append("on_routed")

    @hookimpl
    def on_categorized(self, message: Any, recipients: list) -> None:
        self.calls.append("on_categorized")


async def test_categorizer_hooks_fire_in_the_documented_order(hub_factory) -> None:
    """docs/hooks.md: categorize (per recipient) -> on_resolved -> route (per recipient)
    -> on_routed -> delivery queues -> on_categorized."""
    async with hub_factory() as hub:
        events = CategorizerEvents()
        hub.daemon.hooks.register(events, name="events")
        drop_in(hub.pickup, "a.eml",
                message(to="someone@fabrikam.test, bob@contoso.test, other@fabrikam.test"))
        await wait_for(lambda: "on_categorized" in events.calls)
    assert events.calls == [
        "categorize someone@fabrikam.test", "categorize bob@contoso.test",
        "categorize other@fabrikam.test", "on_resolved",
        "route someone@fabrikam.test", "route other@fabrikam.test",
        "on_routed", "on_categorized"]


async def test_async_receive_hook_rejects_and_defers_pickup_files(hub_factory) -> None:
    async with hub_factory() as hub:
        gate = Gatekeeper()
        hub.daemon.hooks.register(gate, name="gatekeeper")
        drop_in(hub.pickup, "r.eml", message(subject="reject me"))
        drop_in(hub.pickup, "h.eml", message(subject="hold me"))
        ndr = await wait_for(lambda: maildir(hub.root, "Alice"))
        held = await wait_for(lambda: maildir(hub.root, "Bob"))
        await wait_for(lambda: {"FAIL", "DSN"} <= set(event_ids(hub.root)))
        assert not [p for p in hub.pickup.iterdir() if p.name != ".work"]  # nothing left, no .bad
    assert gate.held == 2  # deferred twice, back in the folder, then taken again
    [got] = held
    assert message_from_bytes(got.read_bytes())["Subject"] == "hold me"
    report = message_from_bytes(ndr[0].read_bytes())
    assert report.get_content_type() == "multipart/report"
    status = report.get_payload()[1].get_payload()
    fields = {k.lower(): v for block in status[1:] for k, v in block.items()}
    assert fields["final-recipient"] == "rfc822;bob@contoso.test"
    assert fields["action"] == "failed" and fields["status"] == "5.7.1"
    assert "Refused by a test agent" in fields["diagnostic-code"]


# -- tracing ------------------------------------------------------------------------------

TRACED_RUN = """
import asyncio, sys, time
from pathlib import Path
from hubport.core.logsetup import configure
configure("INFO", json=True)
from hubport.core.daemon import Daemon
from support import drop_in, maildir, message, write_org

async def main(root: Path) -> None:
    daemon = Daemon(write_org(root), signals=False)
    task = asyncio.get_running_loop().create_task(daemon.run())
    await daemon.ready.wait()
    drop_in(root / "pickup", "a.eml", message(to="bob@contoso.test, someone@fabrikam.test"))
    deadline = time.monotonic() + 30
    while not maildir(root, "Bob") and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    daemon.stop()
    await task

asyncio.run(main(Path(sys.argv[1])))
"""


def test_trace_env_var_logs_every_hook_call(tmp_path: Path) -> None:
    done = hubport("-c", TRACED_RUN, str(tmp_path), cwd=tmp_path,
                   env={"HUBPORT_TRACE_HOOKS": "1"})
    assert done.returncode == 0, done.stderr
    assert "Bob" in str(list((tmp_path / "var" / "mailboxes").iterdir()))
    records = []
    for line in done.stderr.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    traced = [r for r in records if r.get("event") == "hook"]
    called = {r["hook"] for r in traced}
    assert {"receive", "on_submitted", "categorize", "route", "on_resolved", "on_routed",
            "on_categorized", "deliver"} <= called, called
    # one record per recipient resolved: bob and the fabrikam recipient
    assert sum(1 for r in traced if r["hook"] == "categorize") >= 2
    assert all("args" in r and "result" in r for r in traced)
    deliver = next(r for r in traced if r["hook"] == "deliver")
    assert "MapiDelivery" in deliver["args"]


def test_tracing_is_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HUBPORT_TRACE_HOOKS", raising=False)
    assert not Hooks(entry_points=False).trace
    monkeypatch.setenv("HUBPORT_TRACE_HOOKS", "0")
    assert not Hooks(entry_points=False).trace
    monkeypatch.setenv("HUBPORT_TRACE_HOOKS", "1")
    assert Hooks(entry_points=False).trace


async def test_plugin_module_named_in_the_config_is_loaded(hub_factory, tmp_path) -> None:
    """``[hubport] Plugins`` names a module beside the organization file: a quick local agent."""
    (tmp_path / "local_policy_plugin.py").write_text(
        "from hubport.core import hookimpl\n"
        "from hubport.core.model import SmtpResponse\n\n"
        "@hookimpl\n"
        "def receive(submission):\n"
        "    if submission.subject == 'blocked':\n"
        "        return SmtpResponse(550, '5.7.1', 'Blocked by local policy')\n")
    async with hub_factory(extra='[hubport]\nPlugins = ["local_policy_plugin"]\n') as hub:
        assert "local_policy_plugin" in {name for name, _ in hub.daemon.hooks.pm.list_name_plugin()}
        drop_in(hub.pickup, "b.eml", message(subject="blocked"))
        drop_in(hub.pickup, "ok.eml", message(subject="fine"))
        ndr = await wait_for(lambda: maildir(hub.root, "Alice"))
        assert b"Blocked by local policy" in ndr[0].read_bytes()
        await wait_for(lambda: maildir(hub.root, "Bob"))
        assert len(maildir(hub.root, "Bob")) == 1


def test_a_misspelt_plugin_module_in_the_config_stops_the_start(tmp_path) -> None:
    from hubport.core.daemon import Daemon, StartupError
    from support import write_org

    config = write_org(tmp_path, extra='[hubport]\nPlugins = ["no_such_plugin_module"]\n')
    with pytest.raises(StartupError, match="no_such_plugin_module"):
        Daemon(config, signals=False)


# -- per-call timeouts --------------------------------------------------------------------------

TIMED_OUT = "plugin hook ran past its timeout; cancelled"
OVERRAN = "plugin hook blocked the event loop past its timeout"


class HangsTwice:
    """An async ``categorize`` agent that hangs (forever) on its first two calls, then
    behaves; counts the cancellations it saw."""

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = 0

    @hookimpl
    async def categorize(self, message: Any, recipient: Any, organization: Any) -> None:
        self.calls += 1
        if self.calls <= 2:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return None


async def test_a_hung_async_categorize_hook_is_cancelled_and_its_message_deferred(
        hub_factory) -> None:
    """PluginHookTimeout: the hung call is cancelled and logged naming the plugin and hook;
    the message stays in Submission (as if the plugin had raised) and is delivered once the
    plugin answers. MessageRetryInterval is 1 s in the test organization."""
    with capture_logs() as logs:
        async with hub_factory(server_extra='PluginHookTimeout = "0.2s"') as hub:
            assert hub.daemon.hooks.hook_timeout == 0.2
            hang = HangsTwice()
            hub.daemon.hooks.register(hang, name="hangs")
            drop_in(hub.pickup, "a.eml", message(subject="hung once"))
            [got] = await wait_for(lambda: maildir(hub.root, "Bob"), timeout=30,
                                   describe=lambda: (hang.calls, event_ids(hub.root)))
    assert message_from_bytes(got.read_bytes())["Subject"] == "hung once"
    assert (hang.calls, hang.cancelled) == (3, 2)
    cancelled = [e for e in logs if e["event"] == TIMED_OUT]
    assert [(e["log_level"], e["plugin"], e["hook"], e["timeout"]) for e in cancelled] == \
        [("error", "hangs", "categorize", 0.2)] * 2
    deferred = [e for e in logs if e["event"].startswith("categorizer failed")]
    assert len(deferred) == 2  # contained like an exception of the plugin: retried, not lost


async def test_a_hung_async_implementation_raises_hook_timeout_and_a_later_one_is_not_called(
        ) -> None:
    class Hangs:
        @hookimpl(tryfirst=True)
        async def receive(self, submission: Submission) -> None:
            await asyncio.sleep(3600)

    class Decides:
        called = False

        @hookimpl
        def receive(self, submission: Submission) -> SmtpResponse:
            Decides.called = True
            return REJECT

    hooks = Hooks(builtins=False, entry_points=False)
    hooks.hook_timeout = 0.1
    hooks.register(Decides(), name="decides")
    hooks.register(Hangs(), name="hangs")
    with pytest.raises(HookTimeout, match="'hangs': hook 'receive'") as raised:
        await asyncio.wait_for(hooks.call_first("receive", submission=submission()), 30)
    assert (raised.value.plugin, raised.value.hook) == ("hangs", "receive")
    assert not Decides.called
    hooks.hook_timeout = None  # no limit: the same call would wait; a quick one answers
    hooks.pm.unregister(name="hangs")
    assert await hooks.call_first("receive", submission=submission()) == REJECT


async def test_a_plugins_own_timeout_error_is_not_taken_for_the_hook_timeout() -> None:
    class OwnTimeout:
        @hookimpl
        async def on_submitted(self, message: Any) -> None:
            raise TimeoutError("the scanner did not answer")

    hooks = Hooks(builtins=False, entry_points=False)
    hooks.register(OwnTimeout(), name="own")
    with capture_logs() as logs, pytest.raises(TimeoutError, match="scanner"):
        await hooks.call_all("on_submitted", message=None)
    assert not [e for e in logs if e["event"] == TIMED_OUT]


async def test_a_sync_implementation_that_overruns_is_logged_with_its_duration() -> None:
    """A plain function cannot be interrupted on the loop: its answer stands, and the
    overrun is logged after it returns, naming the plugin, the hook and the time it took."""
    class Slow:
        @hookimpl
        def categorize(self, message: Any, recipient: Any, organization: Any) -> Any:
            time.sleep(0.3)
            return REJECT

    class Quick:
        @hookimpl
        def on_submitted(self, message: Any) -> None:
            return None

    hooks = Hooks(builtins=False, entry_points=False)
    hooks.hook_timeout = 0.1
    hooks.register(Slow(), name="slow")
    hooks.register(Quick(), name="quick")
    with capture_logs() as logs:
        assert await hooks.call_first("categorize", message=None, recipient=None,
                                      organization=None) == REJECT
        assert await hooks.call_all("on_submitted", message=None) == []
    [entry] = [e for e in logs if e["event"] == OVERRAN]
    assert (entry["log_level"], entry["plugin"], entry["hook"], entry["timeout"]) == \
        ("error", "slow", "categorize", 0.1)
    assert 0.3 <= entry["seconds"] < 60


def test_plugin_hook_timeouts_are_read_from_the_transport_server(tmp_path: Path) -> None:
    types_ = Hooks(entry_points=False).registry.connector_types
    org = load_organization(write_org(tmp_path, server_extra=(
        'PluginHookTimeout = "00:00:05"\nPluginDeliverTimeout = "2h"')), types_)
    server = org.servers[0]
    assert (server.plugin_hook_timeout, server.plugin_deliver_timeout) == (5.0, 7200.0)
    default = load_organization(write_org(tmp_path), types_).servers[0]
    assert (default.plugin_hook_timeout, default.plugin_deliver_timeout) == (30.0, 3600.0)
    with pytest.raises(ConfigError) as bad:
        load_organization(write_org(tmp_path, server_extra='PluginHookTimeout = "0s"'), types_)
    assert "PluginHookTimeout" in str(bad.value) and "org.toml" in str(bad.value)
