"""A SQLite database with one writer thread and group commit.

Durability costs one fsync per commit, so the store never commits per message: callers
put work on an asyncio queue, the writer task takes whatever is waiting, runs it as one
transaction in the database thread (each piece in its own savepoint, so one failing piece
does not undo the others), commits (WAL, ``synchronous=FULL``) and only then resolves every
caller's future. Under load one fsync serves many messages; alone, a piece waits for no one.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

T = TypeVar("T")
C = TypeVar("C", bound=sqlite3.Connection)
Work = Callable[[sqlite3.Connection], Any]

log = structlog.get_logger("hubport.store")


class StoreConnection(sqlite3.Connection):
    """The store's connection; ``shared_db`` is the database shared with the other
    processes of the server, when the store has one (core/queue.py, ``shared``)."""

    shared_db: sqlite3.Connection | None = None

    def close(self) -> None:
        if self.shared_db is not None:
            self.shared_db.close()
        super().close()


class SharedDatabaseError(sqlite3.DatabaseError):
    """The shared database (not the store's own) cannot be opened: the error names it."""

    def __init__(self, path: Path, error: sqlite3.DatabaseError) -> None:
        super().__init__(f"{path}: {error}")
        self.path = path


class StoreError(Exception):
    """The database could not commit (disk full, I/O error): nothing of the batch is durable."""


class Store:
    """The queue database; all access goes through one thread."""

    def __init__(self, path: Path, *, batch_limit: int = 1000,
                 shared: Path | None = None) -> None:
        self.path = path
        #: a database other processes open too (the server's per-server state): written in
        #: short transactions of its own, never held across a group commit
        self.shared = shared
        self.batch_limit = batch_limit
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubport-db")
        self._conn: StoreConnection | None = None
        self._pending: asyncio.Queue[tuple[Work, asyncio.Future[Any]]] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._thread_id: int | None = None
        self.commits = 0
        self.pieces = 0
        #: False after a commit failed (disk full, I/O error) until one succeeds again;
        #: receive paths refuse new mail meanwhile (back pressure, 452 4.3.1)
        self.healthy = True

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self, schema: str, shared_schema: str = "") -> None:
        self._pending = asyncio.Queue()
        await self._run(self._open, schema, shared_schema)
        self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name="db-writer")

    def _open(self, schema: str, shared_schema: str) -> None:
        self._thread_id = threading.get_ident()
        conn = _connect(self.path, StoreConnection)
        try:
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript(schema)
            if self.shared is not None:
                # another process may be creating it at this moment: the busy timeout waits
                try:
                    conn.shared_db = _connect(self.shared, sqlite3.Connection, busy=10000)
                    conn.shared_db.executescript(shared_schema)
                except sqlite3.DatabaseError as exc:
                    raise SharedDatabaseError(self.shared, exc) from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def close(self) -> None:
        if self._writer is not None:
            await self._pending.join()  # type: ignore[union-attr]
            self._writer.cancel()
            try:
                await self._writer
            except asyncio.CancelledError:
                pass
            self._writer = None
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)

    # -- access ------------------------------------------------------------------------

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` inside the next group-committed transaction; return after commit."""
        assert self._pending is not None, "store not open"
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.put_nowait((work, future))
        return await future

    async def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in the database thread outside any write batch."""
        return await self._run(work, self._conn)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- the writer --------------------------------------------------------------------

    async def _write_loop(self) -> None:
        assert self._pending is not None
        pending = self._pending
        while True:
            batch = [await pending.get()]
            while len(batch) < self.batch_limit and not pending.empty():
                batch.append(pending.get_nowait())
            try:
                outcomes, wrote = await self._run(self._commit_batch, [w for w, _ in batch])
            except Exception as exc:  # the commit itself failed: nothing is durable
                error = exc if isinstance(exc, StoreError) else StoreError(str(exc))
                if self.healthy:
                    log.error("queue database cannot commit; new mail waits", error=str(error))
                self.healthy = False
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
            else:
                if wrote and not self.healthy:
                    # only a commit that wrote pages (and so synced them) proves the disk works
                    # again; an empty one touches no file and would clear a fault unseen
                    log.info("queue database commits again", pieces=[
                        getattr(getattr(w, "func", w), "__qualname__", "?") for w, _ in batch])
                    self.healthy = True
                for (_, future), (ok, value) in zip(batch, outcomes):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
            finally:
                for _ in batch:
                    pending.task_done()

    def _commit_batch(self, works: list[Work]) -> tuple[list[tuple[bool, Any]], bool]:
        """Commit ``works`` in one transaction: each one's outcome, and whether rows changed."""
        conn = self._conn
        assert conn is not None
        outcomes: list[tuple[bool, Any]] = []
        changes = conn.total_changes
        conn.execute("BEGIN IMMEDIATE")
        try:
            for work in works:
                conn.execute("SAVEPOINT piece")
                try:
                    outcomes.append((True, work(conn)))
                    conn.execute("RELEASE piece")
                except sqlite3.OperationalError as exc:
                    if _is_fatal(exc):
                        raise
                    conn.execute("ROLLBACK TO piece")
                    conn.execute("RELEASE piece")
                    outcomes.append((False, exc))
                except Exception as exc:
                    conn.execute("ROLLBACK TO piece")
                    conn.execute("RELEASE piece")
                    outcomes.append((False, exc))
            conn.execute("COMMIT")
        except Exception as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise StoreError(f"queue database commit failed: {exc}") from exc
        self.commits += 1
        self.pieces += len(works)
        return outcomes, conn.total_changes != changes


def connect(path: Path, shared: Path | None = None) -> StoreConnection:
    """A connection to a store's database (and its shared one) for a reader beside the
    running store: a tool or a test that looks at the queue as the daemon sees it."""
    conn = _connect(path, StoreConnection)
    if shared is not None:
        conn.shared_db = _connect(shared, sqlite3.Connection)
    return conn


def _connect(path: Path, factory: type[C], busy: int = 5000) -> C:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                           factory=factory)
    conn.execute(f"PRAGMA busy_timeout={busy}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.row_factory = sqlite3.Row
    return conn


def _is_fatal(exc: sqlite3.OperationalError) -> bool:
    """Disk full and I/O errors poison the whole transaction: fail the batch."""
    text = str(exc).lower()
    return "disk" in text or "i/o" in text or "full" in text or "readonly" in text
