"""The real ``hubport`` daemon as a subprocess, for end-to-end and crash tests.

Every start gets its own log file (stderr and stdout); ``DaemonPool`` remembers every
process it started, kills the survivors in its ``close`` and prints their logs, so a test
that fails shows what the daemon said and never leaves a stray process behind.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

RUNNING = "hubport running"
STOPPED = "hubport stopped"
LOG_TAIL = 12_000  # characters of each run's log printed when a test fails


def hubport_command() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m hubport.core.cli``."""
    script = Path(sys.executable).parent / "hubport"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "hubport.core.cli"]


def child_env(failpoints: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("HUBPORT_FAILPOINTS", None)
    env.pop("HUBPORT_TRACE_HOOKS", None)
    env["PYTHONUNBUFFERED"] = "1"
    if failpoints:
        env["HUBPORT_FAILPOINTS"] = failpoints
    return env


def hubport(*args: str, cwd: Path, timeout: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run one ``hubport`` management command to completion (``input``: its stdin)."""
    return subprocess.run([*hubport_command(), *args], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=timeout, check=False,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL)


class Daemon:
    """One started daemon process and its log file."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, args: Sequence[str]) -> None:
        self.proc = proc
        self.log = log
        self.args = list(args)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for_log(self, text: str, timeout: float = 15.0) -> None:
        """Wait until the log contains ``text``; fail early if the process exits first."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if not self.alive() and text not in self.log_text():
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before logging "
                                     f"{text!r}:\n{self.log_text()[-LOG_TAIL:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon did not log {text!r} within {timeout}s:\n"
                                     f"{self.log_text()[-LOG_TAIL:]}")
            time.sleep(0.01)

    def wait_ready(self, timeout: float = 15.0) -> None:
        self.wait_for_log(RUNNING, timeout)

    def kill(self) -> None:
        """SIGKILL: no drain, no flush, no cleanup (a crash)."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def kill_all(self) -> None:
        """SIGKILL the whole server at once, supervisor and workers (a power loss)."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)  # started in a session of its own
        self.proc.wait(10)

    def worker_pids(self) -> dict[int, int]:
        """The latest pid of each worker, from the supervisor's "worker started" lines."""
        pids: dict[int, int] = {}
        for line in self.log_text().splitlines():
            if '"worker started"' in line:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                pids[event["worker"]] = event["pid"]
        return pids

    def worker_deaths(self) -> list[float]:
        """When the supervisor saw a worker die (Unix times), from its log: running, or
        while it started (recovery delivers mail before a worker reports ready)."""
        times = []
        for line in self.log_text().splitlines():
            if '"worker died' in line:
                try:
                    stamp = json.loads(line)["timestamp"]
                except (ValueError, KeyError):
                    continue
                times.append(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
        return times

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)


class DaemonPool:
    """Starts daemons in ``root`` and guarantees they are all gone at the end."""

    def __init__(self, root: Path, logs: Path) -> None:
        self.root = root
        self.logs = logs
        self.started: list[Daemon] = []

    def start(self, *args: str, config: Path | None = None, cwd: Path | None = None,
              failpoints: str | None = None, workers: int | None = 1) -> Daemon:
        """``workers`` 1 (the default here) runs the single-process daemon, whose one queue
        database the tests read; None leaves the daemon's own default (the CPU count)."""
        argv = [*hubport_command(), "run"]
        if workers is not None:
            argv += ["--workers", str(workers)]
        if config is not None:
            argv += ["--config", str(config)]
        argv += list(args)
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"daemon-{len(self.started) + 1:03d}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=cwd or self.root, env=child_env(failpoints),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True)
        daemon = Daemon(proc, log, argv)
        self.started.append(daemon)
        return daemon

    def close(self) -> None:
        for daemon in self.started:
            if daemon.alive():
                try:
                    os.kill(daemon.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                daemon.proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - nothing else to do
                pass
        # captured by pytest and shown only when the test fails
        for daemon in self.started:
            text = daemon.log_text()
            cut = f"... ({len(text) - LOG_TAIL} characters cut) ...\n" if len(text) > LOG_TAIL \
                else ""
            print(f"===== {daemon.log.name}: {' '.join(daemon.args[1:])} "
                  f"(exit {daemon.proc.returncode}) =====\n{cut}{text[-LOG_TAIL:]}")


@contextmanager
def daemon_pool(root: Path, logs: Path | None = None) -> Iterator[DaemonPool]:
    pool = DaemonPool(root, logs or root / "harness-logs")
    try:
        yield pool
    finally:
        pool.close()


def queue_counts(db: Path) -> dict[str, int] | None:
    """Messages left in the queue database, read-only: total and poisoned (None if busy)."""
    if not db.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return None
    try:
        total = conn.execute("SELECT COUNT(*) FROM message").fetchone()[0]
        poison = conn.execute("SELECT COUNT(*) FROM message WHERE state='poison'").fetchone()[0]
        return {"total": total, "poison": poison}
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def server_counts(state: Path) -> dict[str, int] | None:
    """``queue_counts`` summed over every worker's queue database in the state folder
    (None while one of them is busy)."""
    total = {"total": 0, "poison": 0}
    for db in sorted((state / "queue").glob("mail*.que")):
        counts = queue_counts(db)
        if counts is None:
            return None
        total = {k: total[k] + counts[k] for k in total}
    return total
