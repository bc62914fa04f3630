"""The plugin manager: discovery, registries and awaiting hook results.

Discovery order (docs/hooks.md, "Writing a plugin"): the built-in plugins, then the
``hubport`` entry-point group, then plugin modules named in the configuration. Built-ins are
named by module path and imported by name, so ``core`` has no import-time dependency on
``plugins`` or ``agents``.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy
import structlog

from hubport.core import PROJECT_NAME, hookspecs
from hubport.core.connectors import ConnectorType, is_connector_type

log = structlog.get_logger("hubport.hooks")

#: entry-point name -> module; the same names stand in setup.cfg's ``hubport`` group
BUILTIN_PLUGINS: dict[str, str] = {
    "foreign": "hubport.plugins.foreign",
    "send": "hubport.plugins.smtp_send",
    "receive": "hubport.plugins.smtp_receive",
    "mailbox": "hubport.plugins.mailbox",
    "builtin-agents": "hubport.agents.builtin",
    "delivery-agent": "hubport.plugins.delivery_agent",
}


#: hooks called through ``Hooks.call_first`` (marked *first result* in core/hookspecs.py)
FIRST_RESULT_HOOKS = frozenset({
    "receive", "categorize", "deliver", "probe_next_hop", "on_connect", "on_helo",
    "on_starttls", "on_auth",
    "on_mail_from", "on_rcpt_to", "on_data", "on_end_of_headers", "on_end_of_data",
})


#: hooks whose call carries a whole delivery batch: their own, longer timeout
DELIVER_HOOKS = frozenset({"deliver"})


class PluginError(Exception):
    """A plugin could not be loaded or registered something invalid."""


class HookTimeout(Exception):
    """A plugin's async implementation ran past its timeout and was cancelled.

    An ordinary exception on purpose: each caller contains it exactly as it contains a
    plugin that raised (the message is deferred and retried, never lost)."""

    def __init__(self, plugin: str, hook: str, timeout: float) -> None:
        super().__init__(f"plugin {plugin!r}: hook {hook!r} ran past its timeout of "
                         f"{timeout:g} s and was cancelled")
        self.plugin = plugin
        self.hook = hook
        self.timeout = timeout


@dataclass
class Registry:
    """Connector types and delivery agents the plugins registered."""

    connector_types: dict[str, type[ConnectorType]] = field(default_factory=dict)
    delivery_agents: dict[str, type] = field(default_factory=dict)

    def add_connector_type(self, cls: type) -> None:
        if not is_connector_type(cls):
            raise PluginError(f"{cls!r} is not a connector type (needs section and from_config)")
        section = cls.section
        if section in self.connector_types and self.connector_types[section] is not cls:
            raise PluginError(f"two connector types claim section [[{section}]]")
        self.connector_types[section] = cls

    def add_delivery_agent(self, protocol: str, cls: type) -> None:
        key = protocol.upper()
        if key in self.delivery_agents and self.delivery_agents[key] is not cls:
            raise PluginError(f"two delivery agents claim DeliveryProtocol {protocol!r}")
        self.delivery_agents[key] = cls


def _broken_entry_point(pm: pluggy.PluginManager) -> str:
    """The first ``hubport`` entry point that does not load, with its distribution (those
    pluggy skips, a name registered or blocked already, are skipped here too)."""
    for dist in importlib.metadata.distributions():
        for point in dist.entry_points:
            if point.group != PROJECT_NAME or pm.has_plugin(point.name) \
                    or pm.is_blocked(point.name):
                continue
            try:
                point.load()
            except Exception:
                return (f"{point.name!r} ({point.value}, from {dist.metadata['Name']} "
                        f"{dist.version})")
    return "(entry point group 'hubport')"


class Hooks:
    """The pluggy manager plus hubport's async call helpers and registries."""

    def __init__(self, extra_modules: Iterable[str | ModuleType] = (), *, builtins: bool = True,
                 entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.trace = os.environ.get("HUBPORT_TRACE_HOOKS", "") not in ("", "0")
        #: seconds one implementation may take (PluginHookTimeout, PluginDeliverTimeout);
        #: the pipeline sets them from the configuration, None is no limit
        self.hook_timeout: float | None = 30.0
        self.deliver_timeout: float | None = 3600.0
        if builtins:
            for name, module in BUILTIN_PLUGINS.items():
                self.register_module(module, name=name)
        if entry_points:
            try:
                self.pm.load_setuptools_entrypoints(PROJECT_NAME)
            except Exception as exc:  # say which installed plugin, not a bare traceback
                raise PluginError(f"cannot load installed plugin {_broken_entry_point(self.pm)}: "
                                  f"{exc}") from exc
        for extra in extra_modules:
            self.register_module(extra)
        self.pm.check_pending()
        self._refuse_wrappers()
        self.registry = Registry()
        self.pm.hook.register_connector_types(register=self.registry.add_connector_type)
        self.pm.hook.register_delivery_agents(register=self.registry.add_delivery_agent)

    def _refuse_wrappers(self) -> None:
        """A first-result hook is called one implementation at a time (``call_first``), so
        there is no single call for a pluggy wrapper to wrap: refuse one at load."""
        for hook_name in sorted(FIRST_RESULT_HOOKS):
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.wrapper or impl.hookwrapper:
                    raise PluginError(f"plugin {impl.plugin_name!r}: hook {hook_name!r} is first "
                                      "result; wrapper=True/hookwrapper=True is not supported")

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def register_module(self, module: str | ModuleType, name: str | None = None) -> None:
        """Register a plugin module, named by dotted path (imported here) or given imported.

        A module registered already (a built-in, an installed entry point, one named twice)
        stays registered once, whatever name it came under: naming an installed plugin again
        is harmless. Another module under the same name is refused.
        """
        if isinstance(module, str):
            try:
                obj = importlib.import_module(module)
            except Exception as exc:  # a broken plugin must say which one
                raise PluginError(f"cannot import plugin module {module!r}: {exc}") from exc
        elif isinstance(module, ModuleType):
            obj = module
        else:
            raise PluginError(f"a plugin module is a dotted module path or a module object, "
                              f"not {module!r}")
        if self.pm.is_registered(obj):
            return
        label = name or obj.__name__
        if self.pm.has_plugin(label):
            raise PluginError(f"cannot register plugin module {obj.__name__!r} as {label!r}: "
                              f"that name is taken by {self.pm.get_plugin(label)!r}")
        self.pm.register(obj, name=label)

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register a plugin object (tests and embedding applications).

        Its connector types and delivery agents join the registries at once; a connector
        section it adds is read at the next configuration load.
        """
        self.pm.register(plugin, name=name)
        self.pm.check_pending()
        try:
            self._refuse_wrappers()
        except PluginError:
            self.pm.unregister(plugin)
            raise
        caller = self.pm.subset_hook_caller
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        caller("register_connector_types", others)(register=self.registry.add_connector_type)
        caller("register_delivery_agents", others)(register=self.registry.add_delivery_agent)

    async def call_first(self, hook_name: str, **kwargs: Any) -> Any:
        """Call a hook; the first implementation returning non-None decides.

        pluggy's ``firstresult`` semantics for plain and ``async def`` implementations alike:
        they are called one at a time in pluggy's order, each awaited before the next is
        called, and none after the deciding one is called at all (pluggy's own call would
        run every plain implementation before hubport could await the first coroutine).
        """
        if hook_name not in FIRST_RESULT_HOOKS:  # its wrappers would not have been refused
            raise ValueError(f"{hook_name!r} is not a first-result hook")
        chosen = None
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            if impl.wrapper or impl.hookwrapper:  # refused at registration; never reached
                raise PluginError(f"plugin {impl.plugin_name!r} wraps first-result hook "
                                  f"{hook_name!r}; hook wrappers are not supported there")
            result = await self._call_impl(hook_name, impl, _arguments(hook_name, impl, kwargs))
            if result is not None:
                chosen = result
                break
        if self.trace:
            log.info("hook", hook=hook_name, args=_short(kwargs), result=_short(chosen))
        return chosen

    async def call_all(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Call a hook and await every implementation, in call order; the non-None results.

        Like ``call_first``, one implementation at a time, so each gets its own timeout. A
        hook with a pluggy wrapper needs pluggy's single call: its coroutines are then
        awaited in turn, each under the timeout, named by hook alone.
        """
        caller = getattr(self.pm.hook, hook_name)
        impls = caller.get_hookimpls()
        out = []
        if any(impl.wrapper or impl.hookwrapper for impl in impls):
            for result in caller(**kwargs):
                if inspect.isawaitable(result):
                    result = await self._await_limited(hook_name, "(wrapped)", result,
                                                       self._timeout_for(hook_name))
                out.append(result)
        else:
            for impl in reversed(impls):
                result = await self._call_impl(hook_name, impl,
                                               _arguments(hook_name, impl, kwargs))
                if result is not None:
                    out.append(result)
        if self.trace:
            log.info("hook", hook=hook_name, args=_short(kwargs), result=_short(out))
        return out

    def _timeout_for(self, hook_name: str) -> float | None:
        return self.deliver_timeout if hook_name in DELIVER_HOOKS else self.hook_timeout

    async def _call_impl(self, hook_name: str, impl: Any, args: list[Any]) -> Any:
        """Call one implementation under the hook's timeout.

        A coroutine is cancelled at the timeout (``HookTimeout``). A plain function cannot
        be interrupted on the event loop: one that overran is logged, after it returned,
        with the time it held the loop."""
        limit = self._timeout_for(hook_name)
        started = time.monotonic()
        result = impl.function(*args)
        held = time.monotonic() - started
        if limit is not None and held > limit:
            log.error("plugin hook blocked the event loop past its timeout",
                      plugin=impl.plugin_name, hook=hook_name, seconds=round(held, 3),
                      timeout=limit)
        if inspect.isawaitable(result):
            result = await self._await_limited(hook_name, impl.plugin_name, result, limit)
        return result

    @staticmethod
    async def _await_limited(hook_name: str, plugin: str, awaitable: Any,
                             limit: float | None) -> Any:
        if limit is None:
            return await awaitable
        scope = asyncio.timeout(limit)
        try:
            async with scope:
                return await awaitable
        except TimeoutError:
            if not scope.expired():  # the plugin's own TimeoutError: an ordinary exception
                raise
            log.error("plugin hook ran past its timeout; cancelled",
                      plugin=plugin, hook=hook_name, timeout=limit)
            raise HookTimeout(plugin, hook_name, limit) from None

    async def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call an event hook; an exception is logged, never raised (the work is committed)."""
        try:
            await self.call_all(hook_name, **kwargs)
        except Exception:
            log.exception("event hook raised; ignored", hook=hook_name)

    def describe(self) -> list[dict[str, Any]]:
        """Plugins, their versions and hooks, and each hook's call order (``hubport plugins``)."""
        dists = {id(p): d for p, d in self.pm.list_plugin_distinfo()}
        plugins = []
        for name, plugin in self.pm.list_name_plugin():
            dist = dists.get(id(plugin))
            hooks = sorted(
                h.name for h in self.pm.get_hookcallers(plugin) or () if h.name != "__init__"
            )
            plugins.append({
                "name": name,
                "module": getattr(plugin, "__name__", repr(plugin)),
                "version": dist.version if dist else "built-in",
                "hooks": hooks,
            })
        order = {}
        for hook_name in sorted(self.pm.hook.__dict__):
            caller = getattr(self.pm.hook, hook_name)
            impls = caller.get_hookimpls()
            if impls:
                order[hook_name] = [i.plugin_name for i in reversed(impls)]
        return [{"plugins": plugins, "call_order": order}]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 300 else text[:297] + "..."


def _arguments(hook_name: str, impl: Any, kwargs: dict[str, Any]) -> list[Any]:
    """The positional arguments ``impl`` takes, from the call's keyword arguments."""
    try:
        return [kwargs[name] for name in impl.argnames]
    except KeyError as exc:
        raise pluggy.HookCallError(
            f"hook {hook_name!r} called without argument {exc.args[0]!r}") from None
