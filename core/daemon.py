"""The hubport daemon: one transport server of the organization, run until told to stop.

Start-up checks fail fast with a clear message and a non-zero exit: a bad config, a
missing or unwritable folder, a state folder another daemon holds. SIGTERM/SIGINT drain
gracefully (finish the batches in progress, commit, stop); SIGHUP and a change of the config
file reload the organization live — a bad change is refused and the running config kept.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy
import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from hubport.core import queue as q
from hubport.core.backpressure import BackPressure
from hubport.core.config import (
    Organization,
    TransportServer,
    load_organization,
    plugin_modules,
)
from hubport.core.config_fields import ConfigError
from hubport.core.control import Handler, start_control
from hubport.core.counters import SharedCounters
from hubport.core.etcd import EtcdError
from hubport.core.folders import PickupDirectory, ReplayDirectory
from hubport.core.hooks import Hooks, PluginError
from hubport.core.internal_tls import CertificateAuthority, internal_tls, organization_ca_folder
from hubport.core.management import ManagementServer, start_management
from hubport.core.org_cmdlets import LOCAL_FILE
from hubport.core.org_store import (
    REPORT_TTL,
    Loaded,
    OrganizationStore,
    StoreError,
    default_cache,
    is_store_url,
    parse_generation,
    read_cache,
    run_sync,
    write_cache,
)
from hubport.core.org_store import load as load_from_store
from hubport.core.pipeline import Pipeline
from hubport.core.queue_admin import QueueAdmin
from hubport.core.rotating_log import log_writer
from hubport.core.services import ConnectorService, ServiceError, ServiceRuntime
from hubport.core.store import SharedDatabaseError, Store
from hubport.core.tls import TlsConfigError
from hubport.core.tracking import TrackingLog, TrackingSettings
from hubport.core.workers import WorkerSlot, signal_ready

log = structlog.get_logger("hubport.daemon")

EXIT_CONFIG = 2
EXIT_FOLDER = 3
EXIT_LOCKED = 4
EXIT_SERVICE = 5  # a connector service could not start (a binding in use, a bad certificate)


class StartupError(Exception):
    """The daemon cannot start; ``exit_code`` says why (config, folder, lock)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


#: the file of per-worker connection counts in the state folder (core/counters.py)
COUNTERS_NAME = "counters"
QUEUE_LOCK_WAIT = 120.0  # seconds a worker waits for the queue a predecessor still drains


@dataclass
class Paths:
    state: Path
    queue: Path
    lock: Path
    shared: Path


def make_hooks(config: Path | None, extra: tuple[str | ModuleType, ...] = (), *,
               entry_points: bool = True) -> Hooks:
    """Built-ins, entry points, then ``extra`` and the plugin modules the organization file
    names. ``entry_points=False`` leaves installed plugins out (an isolated test hub).

    A module beside the configuration file is importable, for a quick local agent.
    """
    modules = plugin_modules(config)
    if modules and isinstance(config, Path) and str(config.parent) not in sys.path:
        sys.path.insert(0, str(config.parent))
    try:
        return Hooks((*extra, *modules), entry_points=entry_points)
    except (PluginError, pluggy.PluginValidationError) as exc:
        raise StartupError(f"plugin refused: {exc}", EXIT_CONFIG) from exc


def open_store(url: str) -> OrganizationStore:
    try:
        return OrganizationStore.from_url(url)
    except StoreError as exc:
        raise StartupError(f"configuration refused: {exc}", EXIT_CONFIG) from None


def load_store(url: str, hooks: Hooks, cache: Path | None = None) -> Loaded:
    """The organization in force in a store; when the store cannot be reached and a cache
    is given, the last good organization from it (said in the log)."""
    store = open_store(url)
    types, agents = hooks.registry.connector_types, hooks.registry.delivery_agents
    try:
        return run_sync(lambda: load_from_store(store, types, agents))
    except ConfigError as exc:
        raise StartupError(f"configuration refused:\n{exc}", EXIT_CONFIG) from exc
    except StoreError as exc:
        cached = read_cache(cache) if cache is not None else None
        if cached is None:
            raise StartupError(f"configuration unavailable: {exc}", EXIT_CONFIG) from None
        text, generation, revision = cached
        log.warning("the organization store cannot be reached; starting from the cached"
                    " organization", store=store.url, error=str(exc), cache=str(cache),
                    generation=generation, revision=revision)
        try:
            return parse_generation(store, text, generation, revision, types, agents)
        except ConfigError as bad:
            raise StartupError(f"cached configuration refused:\n{bad}", EXIT_CONFIG) from bad


def load(config: Path | None, hooks: Hooks, server: str | None = None) -> Organization:
    """The organization a command or daemon runs with. From a store that cannot be reached,
    the cached one of ``server`` (a queue command still works while etcd is away)."""
    if is_store_url(config):
        url = str(config)
        return load_store(url, hooks, default_cache(open_store(url).url, server)).organization
    try:
        return load_organization(config, hooks.registry.connector_types,
                                 hooks.registry.delivery_agents)
    except ConfigError as exc:
        raise StartupError(f"configuration refused:\n{exc}", EXIT_CONFIG) from exc
    except OSError as exc:
        raise StartupError(f"cannot read configuration {config}: {exc.strerror}",
                           EXIT_CONFIG) from exc


def warn_about(org: Organization, server: TransportServer | None = None) -> None:
    """Log what the organization allows but an administrator should hear about; with the
    ``server`` this process runs as, also what this machine lacks for it (DKIM keys)."""
    for warning in org.config_warnings:
        log.warning("configuration warning", source=org.source, warning=warning)
    if server is None:
        return
    from hubport.core.dkim_keys import dkim_key_folder, key_status

    folder = dkim_key_folder(org, server)
    for config in org.dkim_signing_configs:
        if not config.enabled:
            continue
        for _name, status in key_status(folder, config):
            if status.problem and status.selector.split("-", 1)[0] == config.active_selector:
                log.error("this hub should DKIM-sign the domain's mail but cannot: it leaves"
                          " unsigned until the key is here (Get-DkimSigningConfig)",
                          domain=config.domain, selector=status.selector,
                          problem=status.problem)


def pick_server(org: Organization, name: str | None) -> str:
    if name is None:
        return org.servers[0].name
    try:
        return org.server(name).name
    except KeyError:
        known = ", ".join(s.name for s in org.servers)
        raise StartupError(f"server {name!r} is not in the organization (known: {known})",
                           EXIT_CONFIG) from None


def prepare_state(state: Path, worker: WorkerSlot = WorkerSlot()) -> Paths:
    """Create the state folder layout and make sure it is writable."""
    try:
        (state / "queue").mkdir(parents=True, exist_ok=True)
        # one fixed name per worker: a crash leaves no litter, workers do not collide
        probe = state / f".hubport-write-test{worker.suffix}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"state folder {state} is not usable: {exc.strerror}",
                           EXIT_FOLDER) from exc
    return Paths(state, worker.queue_path(state), state / "hubport.lock",
                 worker.server_db_path(state))


def lock_file(path: Path, *, wait: float = 0.0) -> int | None:
    """An exclusive ``flock`` on ``path`` (created if needed): its fd, or None when another
    process holds it after ``wait`` seconds. The lock dies with the process that holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def lock_state(path: Path) -> int:
    """The state folder's lock: one server per state folder."""
    fd = lock_file(path)
    if fd is None:
        try:
            holder = f" (pid {int(path.read_text().split()[0])})"
        except (OSError, ValueError, IndexError):
            holder = ""
        raise StartupError(f"another hubport daemon{holder} is using the state folder"
                           f" {path.parent}; each transport server needs a StateDirectory of"
                           " its own", EXIT_LOCKED)
    return fd


class Daemon:
    def __init__(self, config: Path | None = None, server: str | None = None,
                 *, extra_plugins: tuple[str | ModuleType, ...] = (), signals: bool = True,
                 entry_points: bool = True, worker: WorkerSlot | None = None,
                 restarted: bool = False, ready_fd: int | None = None) -> None:
        """``worker`` is given when a supervisor (core/supervisor.py) runs this daemon as
        one of its workers: the supervisor then holds the state folder's lock and the
        control socket, and this process serves its own queue; ``restarted`` says it
        replaces a worker that died."""
        self.signals = signals
        self.supervised = worker is not None
        self.worker = worker or WorkerSlot()
        self.restarted = restarted
        self.ready_fd = ready_fd
        #: the organization store, when --config names one (etcd://...), else None
        self.store: OrganizationStore | None = None
        self.loaded: Loaded | None = None
        self.cache: Path | None = None
        if is_store_url(config):
            self.store = open_store(str(config))
            self.cache = default_cache(self.store.url, server)
            self.config_path = None
        else:
            self.config_path = config.resolve() if config else None
        self.server_arg = server
        self.hooks = make_hooks(self.config_path, extra_plugins, entry_points=entry_points)
        if self.store is not None:
            self.loaded = load_store(str(config), self.hooks, self.cache)
            self.org = self.loaded.organization
        else:
            self.org = load(self.config_path, self.hooks)
        self.server_name = pick_server(self.org, server)
        warn_about(self.org, self.org.server(self.server_name))
        if self.store is not None:  # written under the server's own name
            self.cache = default_cache(self.store.url, self.server_name)
        self.pipeline: Pipeline | None = None
        #: the resource monitor governing intake (core/backpressure.py), made by ``run``
        self.backpressure: BackPressure | None = None
        self.folders: list[PickupDirectory] = []
        #: section -> the running service of a connector type that has one
        self.services: dict[str, ConnectorService] = {}
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._lock_fds: list[int] = []
        self._observer: Any = None
        self._store_watch: asyncio.Task[None] | None = None
        self._store_report: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    @property
    def server(self) -> Any:
        return self.org.server(self.server_name)

    async def run(self) -> int:
        server = self.server
        paths = prepare_state(server.state_directory, self.worker)
        await self._lock(paths)
        store = Store(paths.queue, shared=paths.shared)
        try:
            await store.open(q.SCHEMA, q.SHARED_SCHEMA)
        except SharedDatabaseError as exc:
            self._unlock()
            raise StartupError(
                f"the server's shared queue state {exc.path} cannot be used ({exc}); it holds"
                " no mail: move it aside and start again (the workers register their queues"
                " in a new one; suspensions and Retry times are lost)", EXIT_FOLDER) from exc
        except sqlite3.DatabaseError as exc:  # not a database, torn, or unreadable
            self._unlock()
            raise StartupError(
                f"the queue database {paths.queue} cannot be used ({exc}); it is left as it is:"
                " move it aside (keep it, its messages can be recovered from it) and start"
                " again with an empty queue", EXIT_FOLDER) from exc
        tracking = TrackingLog(_tracking_settings(server, self.worker), server.fqdn)
        # before anything can change the queue: the events a crash left in the outbox go to
        # the tracking log first, so the log accounts for every committed message
        await tracking.attach(store)
        flusher = asyncio.get_running_loop().create_task(tracking.run_flusher())
        self.pipeline = Pipeline(self.org, self.server_name, self.hooks, store, tracking,
                                 worker=self.worker)
        # connection limits count across the workers (the supervisor made the file)
        self.counters = await asyncio.to_thread(
            SharedCounters.attach,
            server.state_directory / COUNTERS_NAME if self.supervised else None, self.worker)
        siblings = [WorkerSlot(k, self.worker.count).queue_path(server.state_directory)
                    for k in range(self.worker.count) if k != self.worker.index]
        self.backpressure = BackPressure(lambda: self.org, self.server_name, store,
                                         siblings=siblings)
        control = management = None
        try:
            self._create_services(tracking)
            recovery = await self.pipeline.start()
            await self.backpressure.start()  # intake begins with real figures
            await self._start_folders()
            await self._start_services()
            control_folder = server.state_directory
            if self.supervised:
                control_folder = self.worker.control_folder(control_folder)
                await asyncio.to_thread(control_folder.mkdir, mode=0o700, parents=True,
                                        exist_ok=True)
            admin = QueueAdmin(self.pipeline, backpressure=self.backpressure)
            control = await start_control(control_folder, admin.handle)
            if not self.supervised:  # a supervisor serves the whole server's
                management = await self._start_management(admin.handle)
            if self.signals:
                self._install_signals()
            self._watch_config()
            await self._record_store()
            log.info("worker running" if self.supervised else "hubport running",
                     server=self.server_name, worker=self.worker.index,
                     config=self._config_name(),
                     state=str(server.state_directory),
                     pickup=str(server.pickup_directory_path),
                     replay=str(server.replay_directory_path),
                     recovered=len(recovery.crashed), poisoned=len(recovery.poisoned))
            self.ready.set()
            if self.ready_fd is not None:
                signal_ready(self.ready_fd)
                self.ready_fd = None
            await self._serve()
        finally:
            log.info("draining", server=self.server_name)
            if control is not None:  # queue commands stop before the pipeline does
                await control.stop()
            if management is not None:
                await management.stop()
            for service in self.services.values():
                try:
                    await service.stop()
                except Exception:
                    log.exception("a connector service failed to stop")
            for folder in self.folders:
                await folder.stop()
            await self.pipeline.stop()
            for service in self.services.values():  # deliveries are over: final flushes
                close = getattr(service, "close", None)
                if close is None:
                    continue
                try:
                    await close()
                except Exception:
                    log.exception("a connector service failed to close")
            await self.backpressure.stop()
            self.counters.close()
            if self._observer is not None:
                self._observer.stop()
            for task in (self._store_watch, self._store_report):
                if task is not None:
                    task.cancel()
            flusher.cancel()
            try:
                await flusher
            except asyncio.CancelledError:
                pass
            await asyncio.to_thread(tracking.close)
            await store.close()
            self._unlock()
            log.info("hubport stopped", server=self.server_name)
        return 0

    async def _serve(self) -> None:
        while not self._stop.is_set():
            stop = asyncio.ensure_future(self._stop.wait())
            reload = asyncio.ensure_future(self._reload_requested.wait())
            await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            reload.cancel()
            if self._reload_requested.is_set() and not self._stop.is_set():
                await asyncio.sleep(0.2)  # let an editor finish writing
                self._reload_requested.clear()
                await self.reload()

    def stop(self) -> None:
        self._stop.set()

    async def reload(self) -> bool:
        """Load the config again; apply it if valid, else keep the running one."""
        loaded: Loaded | None = None
        try:
            if self.store is not None:
                text, generation, revision = await self.store.read()
                if self.loaded is not None and (generation, text) == (
                        self.loaded.generation, self.loaded.text):
                    return True  # a change that does not touch the organization in force
                loaded = await asyncio.to_thread(
                    parse_generation, self.store, text, generation, revision,
                    self.hooks.registry.connector_types, self.hooks.registry.delivery_agents)
                org = loaded.organization
            else:
                org = await asyncio.to_thread(load_organization, self.config_path,
                                              self.hooks.registry.connector_types,
                                              self.hooks.registry.delivery_agents)
            org.server(self.server_name)
        except StoreError as exc:
            log.warning("the organization store cannot be read; the running configuration"
                        " stays", error=str(exc))
            return False
        except (ConfigError, OSError, KeyError) as exc:
            log.error("configuration change refused; the running configuration stays",
                      error=str(exc))
            return False
        warn_about(org, org.server(self.server_name))
        old, new = self.server, org.server(self.server_name)
        folders_changed = (old.pickup_directory_path, old.replay_directory_path) != (
            new.pickup_directory_path, new.replay_directory_path)
        if folders_changed:
            try:
                await asyncio.to_thread(_check_folders, new, self.worker)
            except OSError as exc:
                log.error("configuration change refused; the running configuration stays",
                          error=f"folder {exc.filename} is not usable: {exc.strerror}")
                return False
        if new.state_directory != old.state_directory:
            log.warning("StateDirectory changes take effect at the next start",
                        running=str(old.state_directory), configured=str(new.state_directory))
        self.org = org
        assert self.pipeline is not None
        try:
            moved = await self.pipeline.reload(org)
        except Exception:  # the new config is in force; the resubmission is retried later
            log.exception("re-evaluating queues after the reload failed")
            moved = 0
        if folders_changed:
            for folder in self.folders:
                await folder.stop()
            await self._start_folders()
        for section, service in self.services.items():
            try:
                await service.apply(org.connectors_of(section))
            except ServiceError as exc:
                log.error("a connector change could not be applied; its service keeps what it"
                          " had", section=section, error=str(exc))
        if loaded is not None:
            self.loaded = loaded
            await self._record_store()
        log.info("configuration reloaded", resubmitted=moved)
        return True

    def _config_name(self) -> str:
        if self.store is not None and self.loaded is not None:
            return (f"{self.store.url} generation {self.loaded.generation} revision"
                    f" {self.loaded.revision}")
        return str(self.config_path or "<embedded default>")

    async def _record_store(self) -> None:
        """The organization in force from a store: cached (for a start while the store is
        away), logged with its revision, and reported under the store's hubs/ key so an
        administrator sees every hub has converged."""
        if self.store is None or self.loaded is None:
            return
        loaded = self.loaded
        log.info("organization in force", store=self.store.url, generation=loaded.generation,
                 revision=loaded.revision, server=self.server_name)
        if self.cache is not None:
            try:
                await asyncio.to_thread(write_cache, self.cache, loaded.text, self.store.url,
                                        loaded.generation, loaded.revision)
            except OSError as exc:
                log.warning("the organization cache cannot be written", cache=str(self.cache),
                            error=str(exc))
        await self._report(collect=True)

    async def _report(self, *, collect: bool = False) -> bool:
        """Tell the store which generation this server runs (worker 0 speaks for it)."""
        if self.store is None or self.loaded is None or self.worker.index != 0:
            return True
        try:
            await self.store.report(self.server_name, self.loaded.generation,
                                    self.loaded.revision)
            if collect:
                current, _ = await self.store.current()
                if current:  # the last hub to move removes what nobody runs any longer
                    await self.store.collect(keep=current)
        except StoreError as exc:
            log.warning("cannot report the organization in force to the store",
                        error=str(exc))
            return False
        return True

    def _generation(self) -> str:
        return self.loaded.generation if self.loaded is not None else ""

    async def _report_store(self) -> None:
        """Renew the report before its lease ends (and make it again after an outage)."""
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), REPORT_TTL / 3)
                return
            except TimeoutError:
                pass
            await self._report()

    async def _watch_store(self) -> None:
        """Follow the store: a change reloads the organization; a broken watch (the store
        away, a compacted revision) reconnects with backoff and catches up by reading the
        whole organization again."""
        assert self.store is not None
        delay = 1.0
        while not self._stop.is_set():
            revision = self.loaded.revision if self.loaded is not None else 0
            try:
                async for _changed in self.store.changes(revision, self._generation):
                    delay = 1.0
                    self._reload_requested.set()
            except (StoreError, EtcdError) as exc:
                log.warning("watching the organization store failed; retrying",
                            store=self.store.url, error=str(exc), retry_in=delay)
            except asyncio.CancelledError:
                return
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
                return
            except TimeoutError:
                pass
            delay = min(delay * 2, 30.0)
            self._reload_requested.set()  # catch up with what changed meanwhile

    def _create_services(self, tracking: TrackingLog) -> None:
        """One service per connector type that has one (receive listeners, send pools),
        made before the pipeline starts: deliveries of recovered mail already find what
        the services set up for this process (its share of the limits, its log files)."""
        assert self.pipeline is not None
        runtime = ServiceRuntime(self.server_name, self.hooks, self.pipeline, tracking,
                                 lambda: self.org, backpressure=self.backpressure,
                                 worker=self.worker, counters=self.counters,
                                 first_bind=not self.restarted and self.worker.index == 0)
        for section, cls in self.hooks.registry.connector_types.items():
            create = getattr(cls, "create_service", None)
            if create is not None:
                self.services[section] = create(runtime)

    async def _start_management(self, handler: Handler) -> ManagementServer | None:
        """The control requests on TCP for administrators on other machines
        (``ManagementBindings``); a binding that cannot be opened stops the start."""
        try:
            return await start_management(self.org, self.server, handler)
        except (TlsConfigError, OSError) as exc:
            raise StartupError(f"management endpoint: {exc}", EXIT_SERVICE) from exc

    async def _start_services(self) -> None:
        """Hand each service its connectors: listeners open, send settings apply.

        In an organization of several servers this one's internal transport certificate
        is made (or renewed) first, so the other hubs can trust it from its first start."""
        if len(self.org.servers) > 1:
            await self._share_authority()
            try:
                await asyncio.to_thread(internal_tls, self.org, self.server)
            except (TlsConfigError, OSError) as exc:
                raise StartupError(f"internal transport certificate: {exc}",
                                   EXIT_SERVICE) from exc
        for section, service in self.services.items():
            try:
                await service.apply(self.org.connectors_of(section))
            except ServiceError as exc:
                raise StartupError(str(exc), EXIT_SERVICE) from exc

    async def _share_authority(self) -> None:
        """With the organization in a store, every hub trusts the CA certificate kept
        there (made by the first hub that needed one); the store away, the local one."""
        if self.store is None or self.worker.index != 0 or \
                self.server.internal_transport_certificate_authority_file is not None:
            return
        folder = organization_ca_folder(self.org, self.server)
        ca = CertificateAuthority(folder)
        try:
            done = await self.store.share_authority(
                ca.certificate, lambda: ca.ensure(self.org.transport_config.organization_name))
        except StoreError as exc:
            if "another CA" in str(exc):
                raise StartupError(f"internal transport certificate: {exc}",
                                   EXIT_SERVICE) from exc
            log.warning("the organization's CA certificate cannot be checked in the store",
                        error=str(exc))
            return
        log.info("organization CA certificate", store=self.store.url, outcome=done,
                 certificate=str(ca.certificate))

    async def _start_folders(self) -> None:
        self.folders = []
        server = self.server
        for cls, path in ((PickupDirectory, server.pickup_directory_path),
                          (ReplayDirectory, server.replay_directory_path)):
            if path is None:
                continue
            folder = cls(path, self.pipeline,  # type: ignore[arg-type]
                         pressure=self.backpressure)
            try:
                await folder.start()
            except OSError as exc:
                raise StartupError(f"{cls.kind} directory {path} is not usable: {exc.strerror}",
                                   EXIT_FOLDER) from exc
            self.folders.append(folder)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)

    def _watch_config(self) -> None:
        if self.store is not None:
            loop = asyncio.get_running_loop()
            self._store_watch = loop.create_task(self._watch_store(),
                                                 name="organization-store-watch")
            self._store_report = loop.create_task(self._report_store(),
                                                  name="organization-store-report")
            return
        loop = asyncio.get_running_loop()
        # the embedded default: the first organization cmdlet writes ./hubport.toml, which
        # this daemon then runs (core/org_cmdlets.py)
        target = self.config_path or (Path.cwd() / LOCAL_FILE)
        daemon = self

        def changed() -> None:
            if daemon.config_path is None:
                log.info("the organization was written out; running it from now on",
                         config=str(target))
                daemon.config_path = target
            daemon._reload_requested.set()

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                paths = {getattr(event, "src_path", ""), getattr(event, "dest_path", "")}
                if str(target) in {os.fsdecode(p) for p in paths if p} and \
                        event.event_type in ("modified", "created", "moved", "closed"):
                    loop.call_soon_threadsafe(changed)

        observer = Observer()
        observer.schedule(Handler(), str(target.parent), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    async def _lock(self, paths: Paths) -> None:
        """The state folder's lock (unless a supervisor holds it for its workers), then the
        queue's: two processes never work one queue database, even when a supervisor was
        killed and a new one starts while the old workers still drain (the new worker waits
        for them)."""
        if not self.supervised:
            self._lock_fds.append(lock_state(paths.lock))
        queue_lock = paths.queue.with_name(paths.queue.name + ".lock")
        fd = await asyncio.to_thread(lock_file, queue_lock,
                                     wait=QUEUE_LOCK_WAIT if self.supervised else 0.0)
        if fd is None:
            self._unlock()
            raise StartupError(f"another process is using the queue database {paths.queue}",
                               EXIT_LOCKED)
        self._lock_fds.append(fd)

    def _unlock(self) -> None:
        while self._lock_fds:
            os.close(self._lock_fds.pop())


def _check_folders(server: Any, worker: WorkerSlot) -> None:
    """Raise OSError when a Pickup or Replay folder cannot be created and written."""
    for path in (server.pickup_directory_path, server.replay_directory_path):
        if path is None:
            continue
        path.mkdir(parents=True, exist_ok=True)
        # one name per server: no litter after a crash, no clash between hubs sharing it
        probe = path / f".hubport-write-test-{server.name}{worker.suffix}"
        probe.write_bytes(b"")
        probe.unlink()


def _tracking_settings(server: Any, worker: WorkerSlot) -> TrackingSettings:
    """The server's tracking log settings; each worker writes a file family of its own."""
    return TrackingSettings(
        writer=log_writer(worker), writers=worker.count,
        enabled=server.message_tracking_log_enabled,
        path=server.message_tracking_log_path,
        max_age=server.message_tracking_log_max_age or 0,
        max_directory_size=server.message_tracking_log_max_directory_size or (1 << 62),
        max_file_size=server.message_tracking_log_max_file_size,
        subject_logging_enabled=server.message_tracking_log_subject_logging_enabled,
    )


def run(config: Path | None, server: str | None, *, worker: WorkerSlot | None = None,
        restarted: bool = False, ready_fd: int | None = None) -> int:
    """Entry point of ``hubport run`` with one process, and of each supervised worker."""
    if worker is not None:
        structlog.contextvars.bind_contextvars(worker=worker.index)
    return run_to_exit(lambda: Daemon(config, server, worker=worker, restarted=restarted,
                                      ready_fd=ready_fd).run())


def run_to_exit(start: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Build and run a server (``start()`` makes its coroutine) to its exit code: a start-up
    refusal is logged and gives its code, Ctrl-C a clean 0."""
    try:
        return asyncio.run(start())
    except StartupError as exc:
        log.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return 0
