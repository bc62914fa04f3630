"""Which worker of the server this process is: the identity the process model gives each pipeline.

``hubport run --workers N`` starts N worker processes, each a full pipeline (receive, queue,
categorize, route, deliver) with its own queue database; the supervising parent holds the
server's lock and its control socket (core/supervisor.py). What a worker needs to know of
its place is this small value: its index and how many there are. A daemon run in-process
(tests, the plugin test kit) is worker 0 of 1, which is exactly the single-process daemon
hubport was before workers.

Resources that are per server are shared through the state folder, never through memory:
the delivery queues' identities, suspension and Retry state live in one database every
worker attaches (core/queue.py, ``SERVER_SCHEMA``); connection counts live in a small file
of per-worker counters (core/counters.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: message and recipient ids of worker k start at k × ID_STRIDE: an id names one message on
#: the whole server (queue identities, drop and Maildir file names) and tells its worker
ID_STRIDE = 10**12


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """This process's place among the server's workers."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"worker {self.index} of {self.count}")

    @property
    def suffix(self) -> str:
        """What a per-worker name adds: nothing for worker 0 (the names of a
        single-process server stay as they were), ``-<k>`` for the others."""
        return f"-{self.index}" if self.index else ""

    def queue_path(self, state: Path) -> Path:
        """This worker's queue database under the state folder."""
        return state / "queue" / f"mail{self.suffix}.que"

    def server_db_path(self, state: Path) -> Path:
        """The database every worker of the server shares (queues, flags)."""
        return state / "queue" / "server.db"

    def control_folder(self, state: Path) -> Path:
        """Where this worker's own control socket lives (the parent's is in ``state``)."""
        return state / "workers" / str(self.index)

    @property
    def first_id(self) -> int:
        """The lowest message (and recipient) id this worker hands out."""
        return self.index * ID_STRIDE

    def share(self, total: int | None) -> int | None:
        """This worker's part of a server-wide rate (the Pickup messages per minute): the
        parts add up to ``total``, except that each worker gets at least one (a limit lower
        than the number of workers is rounded up to one per worker)."""
        if total is None:
            return None
        base, extra = divmod(total, self.count)
        return max(1, base + (1 if self.index < extra else 0))


def worker_of(message_id: int) -> int:
    """The index of the worker that holds ``message_id`` (see ``ID_STRIDE``)."""
    return message_id // ID_STRIDE


def default_count() -> int:
    """``--workers`` when not given: the CPUs this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


def parse_slot(text: str) -> WorkerSlot:
    """``K/N`` (the supervisor's ``--worker`` argument) as a slot."""
    index, _, count = text.partition("/")
    try:
        return WorkerSlot(int(index), int(count))
    except ValueError:
        raise ValueError(f"--worker wants K/N with 0 <= K < N, not {text!r}") from None


def signal_ready(fd: int) -> None:
    """The worker's side of the start-up pipe: tell the supervisor this worker serves."""
    try:
        os.write(fd, b"ready\n")
    finally:
        os.close(fd)
