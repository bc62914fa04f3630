"""The supervisor: one server made of N worker processes (``hubport run --workers N``).

One Python process is bound by one core (the GIL), so the server runs N full pipelines, each
in a process of its own with its own queue database (core/workers.py). The supervisor is
small on purpose and moves no mail:

* it holds the state folder's lock (one server per state folder) and serves the control
  socket, forwarding each queue command to the workers and merging their answers
  (core/server_admin.py);
* it starts worker 0 first (which checks that no other process holds a binding, then
  listens with SO_REUSEPORT), then the others, and reports ``hubport running`` once all
  are ready; a worker that fails to start makes the server fail with that worker's exit code;
* a worker that dies later is started again (after a pause that grows while it keeps dying)
  and recovers its queue as after any crash; the others go on meanwhile;
* workers end with it: each asks the kernel for SIGTERM when its parent dies
  (``PR_SET_PDEATHSIG``), and each queue database is locked by its worker, so a supervisor
  started after a killed one waits for the old workers to drain rather than share a queue;
* SIGTERM/SIGINT stop the workers (each drains as a single daemon does), SIGHUP is passed on
  (each worker also watches the organization file itself).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import structlog

from hubport.core.control import start_control
from hubport.core.counters import SharedCounters
from hubport.core.daemon import (
    COUNTERS_NAME,
    EXIT_CONFIG,
    EXIT_FOLDER,
    EXIT_LOCKED,
    EXIT_SERVICE,
    load,
    lock_state,
    make_hooks,
    pick_server,
    prepare_state,
    run_to_exit,
    warn_about,
)
from hubport.core.failpoints import ENV as FAILPOINTS_ENV
from hubport.core.management import start_management
from hubport.core.org_store import is_store_url
from hubport.core.server_admin import ServerAdmin
from hubport.core.tls import TlsConfigError
from hubport.core.workers import WorkerSlot

log = structlog.get_logger("hubport.supervisor")

PR_SET_PDEATHSIG = 1
STOP_WAIT = 120.0  # seconds a worker may take to drain before it is killed
#: seconds a worker may take to become ready: longer than it waits for the queue lock of a
#: predecessor that still drains (daemon.QUEUE_LOCK_WAIT), and than recovering a big queue
START_WAIT = 600.0
#: a worker that crashes this many times in a row before it is first ready fails the start
START_CRASHES = 3
RESTART_PAUSE = (1.0, 30.0)  # the first pause before a restart, and the longest
HEALTHY_AFTER = 60.0  # a worker up this long starts again with the shortest pause
#: the exit codes of a worker that refused to start (not a crash): the server fails with them
STARTUP_REFUSALS = (EXIT_CONFIG, EXIT_FOLDER, EXIT_LOCKED, EXIT_SERVICE)


#: looked up in the supervisor, never in the forked child (no dlopen between fork and exec)
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(parent: int) -> None:
    """In the worker, between fork and exec: SIGTERM when the supervisor dies."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


class Worker:
    """One worker process and what the supervisor knows of it."""

    def __init__(self, slot: WorkerSlot) -> None:
        self.slot = slot
        self.process: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.starts = 0
        self.pause = RESTART_PAUSE[0]


class Supervisor:
    def __init__(self, config: Path | None, server: str | None, workers: int,
                 *, log_args: tuple[str, ...] = (), run_args: tuple[str, ...] = ()) -> None:
        self.config = config if is_store_url(config) else config.resolve() if config else None
        hooks = make_hooks(self.config)
        org = load(self.config, hooks, server)  # a store: the workers follow it
        warn_about(org)
        self.server_name = pick_server(org, server)
        transport = org.server(self.server_name)
        self.org, self.transport = org, transport
        self.state = transport.state_directory
        self.count = _workers_needed(workers, self.state, self.server_name,
                                     [transport.pickup_directory_path,
                                      transport.replay_directory_path])
        self.log_args = log_args
        self.run_args = run_args
        self.workers = [Worker(WorkerSlot(k, workers)) for k in range(workers)]
        self._stop = asyncio.Event()
        self._stopping = False

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> int:
        paths = prepare_state(self.state)
        lock = lock_state(paths.lock)
        control = management = None
        try:
            await asyncio.to_thread(SharedCounters.create, self.state / COUNTERS_NAME,
                                    self.count)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, self._signal_all, signal.SIGHUP)
            first, rest = self.workers[0], self.workers[1:]
            code = await self._bring_up(first, first=True)
            if code is None:
                codes = await asyncio.gather(*(self._bring_up(w, first=True) for w in rest))
                code = next((c for c in codes if c is not None), None)
            if code is not None:
                return code
            admin = ServerAdmin(self.server_name, self.state, self.count,
                                tracking=self.transport.message_tracking_log_path)
            control = await start_control(self.state, admin.handle, admin.refusals)
            try:
                management = await start_management(self.org, self.transport, admin.handle,
                                                    admin.refusals)
            except (TlsConfigError, OSError) as exc:
                log.error("management endpoint cannot start", error=str(exc))
                return EXIT_SERVICE
            log.info("hubport running", server=self.server_name, workers=self.count,
                     pids=[w.process.pid for w in self.workers if w.process],
                     config=str(self.config or "<embedded default>"), state=str(self.state))
            watchers = [asyncio.ensure_future(self._watch(w)) for w in self.workers]
            await self._stop.wait()
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            return 0
        finally:
            self._stopping = True
            log.info("stopping workers", server=self.server_name)
            if control is not None:
                await control.stop()
            if management is not None:
                await management.stop()
            await asyncio.gather(*(self._end(w) for w in self.workers))
            os.close(lock)
            log.info("hubport stopped", server=self.server_name)

    async def _launch(self, worker: Worker, *, first: bool) -> int | None:
        """Start ``worker`` once and wait until it is ready: None, or the exit code it died
        with first (0 when the server is told to stop meanwhile)."""
        read_fd, write_fd = os.pipe()
        argv = [sys.executable, "-m", "hubport.core.cli", *self.log_args, "run",
                *self.run_args, "--worker", f"{worker.slot.index}/{self.count}",
                "--ready-fd", str(write_fd)]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        argv += ["--server", self.server_name]
        if not first:
            argv.append("--restarted")
        parent = os.getpid()
        env = None
        if worker.starts:  # a crash test's failpoints kill a worker once, not each of its lives
            env = {k: v for k, v in os.environ.items() if k != FAILPOINTS_ENV}
        worker.started = time.monotonic()
        worker.starts += 1
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *argv, pass_fds=(write_fd,), env=env,
                preexec_fn=lambda: _die_with_parent(parent))
        except (OSError, subprocess.SubprocessError) as exc:  # fork or exec failed
            os.close(read_fd)
            log.error("cannot start a worker process", worker=worker.slot.index,
                      error=str(exc))
            return 1
        finally:
            os.close(write_fd)
        process = worker.process
        ready = asyncio.ensure_future(_read_ready(read_fd))
        died = asyncio.ensure_future(process.wait())
        stop = asyncio.ensure_future(self._stop.wait())
        done, _ = await asyncio.wait({ready, died, stop}, timeout=START_WAIT,
                                     return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if ready in done and ready.result():
            died.cancel()
            log.info("worker started", worker=worker.slot.index, pid=process.pid,
                     restarted=not first)
            return None
        if stop in done:
            return 0  # the worker is running or starting: the caller's shutdown ends it
        if not done:
            log.error("worker did not become ready; stopping it", worker=worker.slot.index,
                      waited=START_WAIT)
            process.kill()
        code = await process.wait()
        ready.cancel()
        died.cancel()
        return code

    async def _bring_up(self, worker: Worker, *, first: bool) -> int | None:
        """Start ``worker`` until it is ready (None). A refusal (configuration, folder,
        lock, binding) ends the attempt with its exit code; a crash (a signal, an exception)
        is started again after a pause. 0 when the server is told to stop meanwhile."""
        crashes = 0
        while True:
            code = await self._launch(worker, first=first)
            if code is None or code in STARTUP_REFUSALS or self._stop.is_set():
                return code if not self._stop.is_set() else 0
            crashes += 1
            if first and crashes >= START_CRASHES:
                log.error("worker keeps dying before it is ready; the server does not start",
                          worker=worker.slot.index, exit_code=code, attempts=crashes)
                return code if code > 0 else 1
            log.error("worker died while starting; starting it again",
                      worker=worker.slot.index, exit_code=code, pause=worker.pause)
            if not await self._pause(worker):
                return 0

    async def _pause(self, worker: Worker) -> bool:
        """Wait before a restart (longer while the worker keeps dying); False when the
        server is told to stop meanwhile."""
        if time.monotonic() - worker.started > HEALTHY_AFTER:
            worker.pause = RESTART_PAUSE[0]
        try:
            await asyncio.wait_for(self._stop.wait(), worker.pause)
            return False
        except TimeoutError:
            worker.pause = min(worker.pause * 2, RESTART_PAUSE[1])
            return True

    async def _watch(self, worker: Worker) -> None:
        """Start ``worker`` again whenever it dies, until the server stops."""
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            if self._stopping or self._stop.is_set():
                return
            if time.monotonic() - worker.started > HEALTHY_AFTER:
                worker.pause = RESTART_PAUSE[0]
            log.error("worker died; starting it again", worker=worker.slot.index,
                      pid=worker.process.pid, exit_code=code, pause=worker.pause)
            # its connections died with it: the server-wide counts must not wait for the
            # restart to say so
            await asyncio.to_thread(self._clear_counts, worker)
            while True:
                if not await self._pause(worker):
                    return
                failed = await self._bring_up(worker, first=False)
                if failed is None or self._stop.is_set():
                    break
                log.error("worker could not start again; trying later",
                          worker=worker.slot.index, exit_code=failed)

    def _clear_counts(self, worker: Worker) -> None:
        try:
            SharedCounters.attach(self.state / COUNTERS_NAME, worker.slot).close()
        except (OSError, ValueError) as exc:
            log.error("cannot clear a dead worker's connection counts",
                      worker=worker.slot.index, error=str(exc))

    async def _end(self, worker: Worker) -> None:
        process = worker.process
        if process is None or process.returncode is not None:
            return
        try:
            process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(process.wait(), STOP_WAIT)
        except TimeoutError:
            log.error("worker did not drain in time; killing it", worker=worker.slot.index,
                      waited=STOP_WAIT)
            process.kill()
            await process.wait()

    def _signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(sig)


def _workers_needed(requested: int, state: Path, server: str,
                    folders: list[Path | None]) -> int:
    """``requested``, or more when mail waits for a worker beyond it.

    Each worker works only its own queue database and the folder files it claimed, so
    after a start with fewer workers (``--workers`` lowered, or fewer CPUs: a container
    limit) the mail of the missing ones would wait unseen. The server starts as many as
    that mail needs, and says so.
    """
    needed = requested
    for path in (state / "queue").glob("mail-*.que"):
        match = re.fullmatch(r"mail-(\d+)\.que", path.name)
        if match is None or int(match[1]) < needed:
            continue
        try:
            with closing(sqlite3.connect(path.as_uri() + "?mode=ro", uri=True,
                                         timeout=5)) as db:
                waiting = db.execute("SELECT COUNT(*) FROM message").fetchone()[0]
        except sqlite3.Error:
            waiting = 1  # unreadable now: its own worker will say why
        if waiting:
            needed = int(match[1]) + 1
    name = re.sub(r"[^A-Za-z0-9]", "_", server)
    claimed = re.compile(rf"[PR]{name}\+(\d+)\.")
    for folder in folders:
        work = folder / ".work" if folder is not None else None
        if work is None or not work.is_dir():
            continue
        for entry in os.listdir(work):
            match = claimed.match(entry)
            if match is not None:
                needed = max(needed, int(match[1]) + 1)
    if needed > requested:
        log.warning("starting more workers than asked: the queues of workers beyond that"
                    " number still hold mail", requested=requested, workers=needed)
    return needed


async def _read_ready(fd: int) -> bool:
    """True once the worker wrote its ready line; False when it closed the pipe first."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    pipe = os.fdopen(fd, "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        return (await reader.readline()).strip() == b"ready"
    finally:
        transport.close()


def run(config: Path | None, server: str | None, workers: int,
        log_args: tuple[str, ...] = (), run_args: tuple[str, ...] = ()) -> int:
    """Entry point of ``hubport run --workers N`` (N > 1). ``log_args`` and ``run_args``
    are passed on to each worker's command line (before and after ``run``)."""
    return run_to_exit(lambda: Supervisor(config, server, workers, log_args=log_args,
                                          run_args=run_args).run())
