"""The durable queue: Submission, one delivery queue per next hop, Unreachable and Poison.

One SQLite database per worker process (``<StateDirectory>/queue/mail.que``, then
``mail-1.que``…; core/workers.py). The message bytes are stored once; each recipient is a row
with its own status, next hop queue, attempts, last response and next retry time. A message
whose recipients are all final is removed in the same transaction that made the last one final.

What is per server rather than per worker lives in one more database every worker opens
beside its own (``queue/server.db``, reached as ``shared(conn)``): the delivery queues'
identities (a next hop has one queue id on the whole server), their suspension and Retry
state, and the Submission and Unreachable suspension flags. Both databases carry the same
``delivery_queue`` table: the worker's copy keeps the id and next hop its recipients refer to
(and when this worker last tried it), the shared one the state. Writes to the shared database
are small transactions of their own, not part of the worker's group commit: a queue id taken
by a batch that then fails to commit is simply unused, and Retry state is timing, not mail.
A store opened without a shared database (``Store(path)`` alone) keeps all of it in its own
database, as a single-process queue did.

The functions taking a ``sqlite3.Connection`` run in the database thread, inside a
group-committed transaction (``Store.write``) or a read (``Store.read``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hubport.core.body import MessageBody, spool_folder
from hubport.core.model import (
    Envelope,
    EnvelopeRecipient,
    MailFrom,
    NextHop,
    Notify,
    QueuedMessage,
    QueuedRecipient,
    RecipientStatus,
    Submission,
)

S = RecipientStatus

_MESSAGES = """
CREATE TABLE IF NOT EXISTS message (
    -- AUTOINCREMENT: an id is never reused after its message is removed, because drop
    -- and Maildir file names are made from these ids (a reused id would overwrite a file
    -- the gateway or the mail reader has not taken yet)
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL DEFAULT '',
    sender TEXT NOT NULL,
    body TEXT, ret TEXT, envid TEXT, auth TEXT, smtputf8 INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL,
    source TEXT NOT NULL, source_name TEXT NOT NULL DEFAULT '',
    subject TEXT NOT NULL DEFAULT '',
    client_ip TEXT NOT NULL DEFAULT '', client_hostname TEXT NOT NULL DEFAULT '',
    reference TEXT,
    received_at REAL NOT NULL, expires_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'submitted',      -- submitted | active | poison
    suspended INTEGER NOT NULL DEFAULT 0,
    in_flight INTEGER NOT NULL DEFAULT 0,
    crash_count INTEGER NOT NULL DEFAULT 0,
    suspect INTEGER NOT NULL DEFAULT 0,
    not_before REAL,
    data BLOB NOT NULL,
    -- a large body: data is its first octets, the rest is this file of the spool folder
    -- from spool_offset on (core/body.py)
    spool TEXT, spool_offset INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS message_state ON message(state, suspended);
CREATE INDEX IF NOT EXISTS message_suspect ON message(id) WHERE suspect=1;
CREATE INDEX IF NOT EXISTS message_expiry ON message(expires_at);
CREATE TABLE IF NOT EXISTS recipient (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message INTEGER NOT NULL REFERENCES message(id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    notify TEXT NOT NULL DEFAULT '',
    orcpt TEXT,
    status TEXT NOT NULL,
    queue INTEGER REFERENCES delivery_queue(id),
    attempts INTEGER NOT NULL DEFAULT 0,
    last_response TEXT,
    next_retry REAL,
    first_attempt REAL,
    delay_notified INTEGER NOT NULL DEFAULT 0,
    drop_intent TEXT,
    suspended INTEGER NOT NULL DEFAULT 0  -- Suspend-Message on a delivery/Unreachable item
);
CREATE INDEX IF NOT EXISTS recipient_work ON recipient(queue, status, next_retry);
CREATE INDEX IF NOT EXISTS recipient_message ON recipient(message);
CREATE INDEX IF NOT EXISTS recipient_status ON recipient(status);
"""
#: per server (the shared database) and per worker alike (core/workers.py)
_QUEUES = """CREATE TABLE IF NOT EXISTS delivery_queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_type TEXT NOT NULL, domain TEXT NOT NULL, connector TEXT NOT NULL,
    suspended INTEGER NOT NULL DEFAULT 0,
    -- queue Retry after a connection failure (docs/exchange.md, "Queues and retry"):
    -- next_retry is set while the queue waits for its next attempt; retry_count counts
    -- the failures in a row
    last_error TEXT, next_retry REAL,
    retry_count INTEGER NOT NULL DEFAULT 0,
    last_retry REAL,
    -- with several workers, the one that makes the attempt after a Retry (the others wait
    -- for its outcome) and until when that holds (take_attempt)
    attempt_by INTEGER, attempt_until REAL,
    UNIQUE (delivery_type, domain, connector)
);
CREATE TABLE IF NOT EXISTS queue_flag (name TEXT PRIMARY KEY, suspended INTEGER NOT NULL);
"""
_CLAIMS = """
CREATE TABLE IF NOT EXISTS claim (
    name TEXT PRIMARY KEY, message INTEGER, at REAL NOT NULL
);
"""
SCHEMA = _MESSAGES + _QUEUES + _CLAIMS
#: the server's shared database: the delivery queues and the suspension flags
SHARED_SCHEMA = _QUEUES

#: columns added after the first schema: ``upgrade`` adds the ones an older database lacks
#: (``CREATE TABLE IF NOT EXISTS`` leaves an existing table as it was)
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("recipient", "suspended", "INTEGER NOT NULL DEFAULT 0"),
    ("delivery_queue", "retry_count", "INTEGER NOT NULL DEFAULT 0"),
    ("delivery_queue", "last_retry", "REAL"),
    ("delivery_queue", "attempt_by", "INTEGER"),
    ("delivery_queue", "attempt_until", "REAL"),
    ("message", "spool", "TEXT"),
    ("message", "spool_offset", "INTEGER NOT NULL DEFAULT 0"),
)
#: made after the columns they use exist (``upgrade``): a removed message's spool file is
#: remembered in the same transaction, and removed once no message row names it
_SPOOL = (
    "CREATE TABLE IF NOT EXISTS spool_garbage (name TEXT PRIMARY KEY)",
    "CREATE INDEX IF NOT EXISTS message_spool ON message(spool) WHERE spool IS NOT NULL",
    "CREATE TRIGGER IF NOT EXISTS message_spool_gone AFTER DELETE ON message"
    " WHEN old.spool IS NOT NULL"
    " BEGIN INSERT OR IGNORE INTO spool_garbage (name) VALUES (old.spool); END",
)

MESSAGE_COLUMNS = (
    "m.id, m.message_id, m.sender, m.body, m.ret, m.envid, m.auth, m.smtputf8, m.size, "
    "m.source, m.source_name, m.subject, m.received_at, m.expires_at, m.crash_count"
)
RECIPIENT_COLUMNS = (
    "r.id, r.message, r.address, r.notify, r.orcpt, r.status, r.queue, r.attempts, "
    "r.last_response, r.next_retry, r.first_attempt, r.delay_notified, r.drop_intent"
)


def shared(conn: sqlite3.Connection) -> sqlite3.Connection:
    """Where the per-server state is: the shared database (``Store(shared=...)``), or
    ``conn`` itself when the store has none (a queue used alone)."""
    other = getattr(conn, "shared_db", None)
    return conn if other is None else other


class SharedStateError(Exception):
    """The server's shared database refused a write (busy past its timeout, disk full, I/O).

    Not an ``sqlite3.OperationalError`` on purpose: the store fails only the piece of work
    that met it, never the whole group commit of the worker's own database, which is fine.
    """


class _SharedWrite:
    """A write transaction on the shared database (``BEGIN IMMEDIATE``: the workers'
    read-modify-writes never interleave); inside the caller's transaction when there is
    no shared database."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.db = shared(conn)
        self.own = self.db is not conn

    def __enter__(self) -> sqlite3.Connection:
        if self.own:
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise SharedStateError(f"server queue state: {exc}") from exc
        return self.db

    def __exit__(self, kind: object, error: BaseException | None, *_: object) -> None:
        if not self.own:
            return
        try:
            if kind is None:
                self.db.execute("COMMIT")
            elif self.db.in_transaction:  # SQLite may have rolled back already
                self.db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise SharedStateError(f"server queue state: {exc}") from exc
        if isinstance(error, sqlite3.Error):
            raise SharedStateError(f"server queue state: {error}") from error


def start_ids_at(conn: sqlite3.Connection, first: int) -> None:
    """Message and recipient ids handed out from now on are at least ``first`` (worker k
    counts from k × ID_STRIDE, so ids are unique on the server; core/workers.py)."""
    if first <= 0:
        return
    for table in ("message", "recipient"):
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name=?", (table,)).fetchone()
        if row is None:
            conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?,?)", (table, first))
        elif row[0] < first:
            conn.execute("UPDATE sqlite_sequence SET seq=? WHERE name=?", (first, table))


def adopt_queues(conn: sqlite3.Connection) -> int:
    """Make the worker's delivery queues agree with the shared database; returns how many
    changed id. Each local queue's next hop is looked up there: known → the local id
    becomes the shared one (its recipients follow); unknown → it is registered, with its
    id when that is free, and its state (a queue database from before workers, or one
    whose shared database was moved aside, keeps its suspension and Retry state)."""
    db = shared(conn)
    if db is conn:
        return 0
    moves: dict[int, int] = {}
    for row in conn.execute("SELECT id, delivery_type, domain, connector, suspended,"
                            " last_error, next_retry, retry_count FROM delivery_queue"
                            " ORDER BY id").fetchall():
        local, key = row[0], (row[1], row[2], row[3])
        with _SharedWrite(conn) as w:
            found = w.execute("SELECT id FROM delivery_queue WHERE delivery_type=? AND"
                              " domain=? AND connector=?", key).fetchone()
            if found is None:
                free = w.execute("SELECT 1 FROM delivery_queue WHERE id=?",
                                 (local,)).fetchone() is None
                cur = w.execute(
                    "INSERT INTO delivery_queue (id, delivery_type, domain, connector,"
                    " suspended, last_error, next_retry, retry_count) VALUES (?,?,?,?,?,?,?,?)",
                    (local if free else None, *key, row[4], row[5], row[6], row[7]))
                found = (cur.lastrowid,)
        if found[0] != local:
            moves[local] = int(found[0])
    if moves:
        # first out of the way (negative ids), then to the shared ids: a local queue that
        # keeps its id cannot hold one of the new ids (a shared id belongs to one next hop)
        conn.execute("PRAGMA defer_foreign_keys=ON")
        for old, new in moves.items():
            conn.execute("UPDATE delivery_queue SET id=? WHERE id=?", (-new, old))
            conn.execute("UPDATE recipient SET queue=? WHERE queue=?", (-new, old))
        for new in moves.values():
            conn.execute("UPDATE delivery_queue SET id=? WHERE id=?", (new, -new))
            conn.execute("UPDATE recipient SET queue=? WHERE queue=?", (new, -new))
    flags = conn.execute("SELECT name, suspended FROM queue_flag WHERE name IN"
                         " ('Submission','Unreachable')").fetchall()
    if flags:
        with _SharedWrite(conn) as w:
            w.executemany("INSERT OR IGNORE INTO queue_flag (name, suspended) VALUES (?,?)",
                          [tuple(f) for f in flags])
        conn.execute("DELETE FROM queue_flag WHERE name IN ('Submission','Unreachable')")
    return len(moves)


def upgrade(conn: sqlite3.Connection) -> list[str]:
    """Add the columns a queue database from an older hubport lacks; returns what was added."""
    added: list[str] = []
    for db in dict.fromkeys((conn, shared(conn))):
        for table, column, declaration in ADDED_COLUMNS:
            if db is not conn and table != "delivery_queue":
                continue
            present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            if column in present:
                continue
            try:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            except sqlite3.OperationalError as exc:  # another worker added it just now
                if "duplicate column" not in str(exc):
                    raise
                continue
            added.append(f"{'server.' if db is not conn else ''}{table}.{column}")
    for statement in _SPOOL:
        conn.execute(statement)
    return added


# -- row conversion ----------------------------------------------------------------------


def _notify_text(notify: Iterable[Notify]) -> str:
    return ",".join(sorted(n.value for n in notify))


def _notify_set(text: str) -> frozenset[Notify]:
    return frozenset(Notify(v) for v in text.split(",") if v)


def recipient_from_row(row: sqlite3.Row) -> QueuedRecipient:
    return QueuedRecipient(
        id=row["id"], message_id=row["message"], address=row["address"],
        status=S(row["status"]), notify=_notify_set(row["notify"]), orcpt=row["orcpt"],
        queue_id=row["queue"], attempts=row["attempts"], last_response=row["last_response"],
        next_retry=row["next_retry"], first_attempt=row["first_attempt"],
        delay_notified=bool(row["delay_notified"]), drop_intent=row["drop_intent"],
    )


def message_from_row(row: sqlite3.Row, data: bytes = b"", folder: Path | None = None
                     ) -> QueuedMessage:
    """The message of ``row``; its whole body when ``data`` holds the row's data column and
    ``folder`` the spool folder (``load_messages``), else just ``data``."""
    if folder is not None and row["spool"] is not None:
        body = MessageBody(prefix=data, spool=folder / row["spool"],
                           offset=row["spool_offset"], size=row["size"])
    else:
        body = MessageBody.of(data)
    return QueuedMessage(
        id=row["id"], internal_id=str(row["id"]), message_id=row["message_id"],
        mail_from=MailFrom(
            address=row["sender"], body=row["body"], ret=row["ret"], envid=row["envid"],
            auth=row["auth"], smtputf8=bool(row["smtputf8"]),
        ),
        body=body, size=row["size"], source=row["source"], source_name=row["source_name"],
        subject=row["subject"], received_at=row["received_at"], expires_at=row["expires_at"],
        crash_count=row["crash_count"],
    )


# -- spool files ---------------------------------------------------------------------------


def spool_folder_of(conn: sqlite3.Connection) -> Path:
    """The spool folder of the queue database ``conn`` has open (core/body.py)."""
    for _, name, file in conn.execute("PRAGMA database_list"):
        if name == "main":
            return spool_folder(Path(file))
    raise LookupError("no main database")


def spool_names(conn: sqlite3.Connection) -> set[str]:
    """Every spool file a message row names (a file not among them is nobody's)."""
    return {r[0] for r in conn.execute("SELECT spool FROM message WHERE spool IS NOT NULL")}


def spool_garbage(conn: sqlite3.Connection, limit: int = 200) -> tuple[list[str], list[str]]:
    """(spool files to remove now, garbage rows to forget): the files of removed messages
    that no other message row still names."""
    names = [r[0] for r in conn.execute("SELECT name FROM spool_garbage LIMIT ?", (limit,))]
    named = {r[0] for r in conn.execute(
        f"SELECT spool FROM message WHERE spool IN ({','.join('?' * len(names))})",
        names)} if names else set()
    return [n for n in names if n not in named], names


def forget_spool_garbage(conn: sqlite3.Connection, names: Sequence[str]) -> None:
    conn.executemany("DELETE FROM spool_garbage WHERE name=?", [(n,) for n in names])


# -- submission --------------------------------------------------------------------------


def insert_submission(
    conn: sqlite3.Connection, sub: Submission, now: float, expires_at: float
) -> int:
    """Commit a new message to the Submission queue; returns its internal id."""
    mf = sub.envelope.mail_from
    body = sub.body
    if body.spool is not None and body.spool.parent != spool_folder_of(conn):
        raise ValueError(f"{body.spool} is not in this queue's spool folder: only a file the "
                         "queue can find again may be named")
    cur = conn.execute(
        "INSERT INTO message (message_id, sender, body, ret, envid, auth, smtputf8, size,"
        " source, source_name, subject, client_ip, client_hostname, reference,"
        " received_at, expires_at, data, spool, spool_offset)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (sub.message_id, mf.address, mf.body, mf.ret, mf.envid, mf.auth, int(mf.smtputf8),
         body.size, sub.source, sub.source_name, sub.subject, sub.client_ip,
         sub.client_hostname, sub.reference, now, expires_at, body.prefix,
         body.spool.name if body.spool is not None else None, body.offset),
    )
    msg_id = cur.lastrowid
    assert msg_id is not None
    conn.executemany(
        "INSERT INTO recipient (message, address, notify, orcpt, status) VALUES (?,?,?,?,?)",
        [(msg_id, r.address, _notify_text(r.notify), r.orcpt, S.SUBMITTED.value)
         for r in sub.envelope.recipients],
    )
    if sub.claim is not None:
        conn.execute("INSERT OR REPLACE INTO claim (name, message, at) VALUES (?,?,?)",
                     (sub.claim, msg_id, now))
    return msg_id


def claims_known(conn: sqlite3.Connection, names: Sequence[str]) -> set[str]:
    known: set[str] = set()
    for i in range(0, len(names), 500):
        chunk = names[i : i + 500]
        marks = ",".join("?" * len(chunk))
        known.update(r[0] for r in conn.execute(
            f"SELECT name FROM claim WHERE name IN ({marks})", chunk))
    return known


def forget_claims(conn: sqlite3.Connection, names: Sequence[str]) -> None:
    conn.executemany("DELETE FROM claim WHERE name = ?", [(n,) for n in names])


def forget_other_claims(conn: sqlite3.Connection, prefix: str, keep: Sequence[str]) -> None:
    """Drop the claim rows of a folder whose files are gone (all but ``keep``)."""
    kept = set(keep)
    stale = [(r[0],) for r in conn.execute("SELECT name FROM claim WHERE name LIKE ?",
                                           (prefix + "%",)) if r[0] not in kept]
    conn.executemany("DELETE FROM claim WHERE name = ?", stale)


# -- reading work ------------------------------------------------------------------------


def load_messages(
    conn: sqlite3.Connection, ids: Sequence[int], *, with_data: bool = True,
    recipient_filter: str = "", params: Sequence[object] = (),
) -> list[QueuedMessage]:
    """Load messages by id with their recipients (optionally filtered by an SQL clause)."""
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    data_col = ", m.data, m.spool, m.spool_offset" if with_data else ""
    rows = conn.execute(
        f"SELECT {MESSAGE_COLUMNS}{data_col} FROM message m WHERE m.id IN ({marks})"
        " ORDER BY m.id", list(ids)).fetchall()
    folder = spool_folder_of(conn) if with_data and any(
        r["spool"] is not None for r in rows) else None
    messages = {r["id"]: message_from_row(r, bytes(r["data"]) if with_data else b"", folder)
                for r in rows}
    clause = f" AND ({recipient_filter})" if recipient_filter else ""
    for row in conn.execute(
        f"SELECT {RECIPIENT_COLUMNS} FROM recipient r WHERE r.message IN ({marks}){clause}"
        " ORDER BY r.id", [*ids, *params]):
        messages[row["message"]].recipients.append(recipient_from_row(row))
    return [messages[i] for i in ids if i in messages]


def submitted_message_ids(conn: sqlite3.Connection, limit: int, now: float) -> list[int]:
    """Messages waiting for the categorizer; a suspect (crashed before) goes alone."""
    if _flag(conn, "Submission"):
        return []
    ready = ("state='submitted' AND suspended=0 AND in_flight=0"
             " AND COALESCE(not_before,0)<=?")
    suspect = conn.execute(
        f"SELECT id FROM message INDEXED BY message_suspect WHERE suspect=1 AND {ready}"
        " ORDER BY id LIMIT 1", (now,)).fetchall()
    if suspect:
        return [suspect[0][0]]
    return [r[0] for r in conn.execute(
        f"SELECT id FROM message WHERE {ready} ORDER BY id LIMIT ?", (now, limit))]


def due_for_delivery(
    conn: sqlite3.Connection, queue_id: int, now: float, limit: int,
    exclude: Iterable[int] = (),
) -> tuple[list[int], float | None]:
    """Message ids with recipients due in a delivery queue, and the next due time after."""
    excluded = set(exclude)
    due = ("r.queue=? AND r.status IN ('Ready','Retry') AND COALESCE(r.next_retry,0)<=?"
           " AND r.suspended=0 AND m.state='active' AND m.suspended=0 AND m.in_flight=0")
    # a message that crashed the process before is delivered alone (only it is blamed
    # if it crashes again); suspects are rare, so look for one through their own index
    for row in conn.execute(
        f"SELECT DISTINCT r.message FROM message m JOIN recipient r ON r.message=m.id"
        f" WHERE m.suspect=1 AND {due} LIMIT ?", (queue_id, now, len(excluded) + 1)):
        if row[0] not in excluded:
            return [row[0]], None
    ids: list[int] = []
    for row in conn.execute(
        f"SELECT DISTINCT r.message FROM recipient r JOIN message m ON m.id=r.message"
        f" WHERE {due} AND m.suspect=0 LIMIT ?",  # index order: no sort of a long queue
        (queue_id, now, limit + len(excluded))):
        if row[0] in excluded:
            continue
        ids.append(row[0])
        if len(ids) >= limit:
            break
    later = conn.execute(
        "SELECT MIN(r.next_retry) FROM recipient r JOIN message m ON m.id=r.message"
        " WHERE r.queue=? AND r.status='Retry' AND r.next_retry>? AND m.state='active'"
        " AND m.suspended=0 AND r.suspended=0", (queue_id, now)).fetchone()[0]
    return ids, later


def queue_ids_with_work(conn: sqlite3.Connection) -> list[int]:
    return [r[0] for r in conn.execute(
        "SELECT DISTINCT queue FROM recipient WHERE queue IS NOT NULL"
        " AND status IN ('Ready','Retry')")]


def other_queues_of(conn: sqlite3.Connection, message_ids: Sequence[int],
                    queue_id: int) -> set[int]:
    """The other delivery queues with work for these messages.

    While one queue holds a bifurcated message in flight, the others skip it and may go
    idle; they must be woken when it is released.
    """
    found: set[int] = set()
    ids = list(message_ids)
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        marks = ",".join("?" * len(chunk))
        found.update(r[0] for r in conn.execute(
            f"SELECT DISTINCT queue FROM recipient WHERE message IN ({marks})"
            " AND queue IS NOT NULL AND queue<>? AND status IN ('Ready','Retry')",
            [*chunk, queue_id]))
    return found


# -- delivery queues ---------------------------------------------------------------------


def ensure_queue(conn: sqlite3.Connection, hop: NextHop) -> int:
    """The id of ``hop``'s delivery queue: the server's (shared) id, known locally too."""
    find = "SELECT id FROM delivery_queue WHERE delivery_type=? AND domain=? AND connector=?"
    row = conn.execute(find, hop.key).fetchone()
    if row:
        return int(row[0])
    db = shared(conn)
    if db is not conn:
        with _SharedWrite(conn) as w:
            w.execute("INSERT OR IGNORE INTO delivery_queue (delivery_type, domain, connector)"
                      " VALUES (?,?,?)", hop.key)
            queue_id = int(w.execute(find, hop.key).fetchone()[0])
        conn.execute("INSERT INTO delivery_queue (id, delivery_type, domain, connector)"
                     " VALUES (?,?,?,?)", (queue_id, *hop.key))
        return queue_id
    cur = conn.execute(
        "INSERT INTO delivery_queue (delivery_type, domain, connector) VALUES (?,?,?)", hop.key)
    assert cur.lastrowid is not None
    return cur.lastrowid


def queues_in_retry(conn: sqlite3.Connection) -> dict[int, str | None]:
    """The delivery queues waiting for their next attempt, with their last error."""
    return {int(r[0]): r[1] for r in shared(conn).execute(
        "SELECT id, last_error FROM delivery_queue WHERE next_retry IS NOT NULL")}


def queue_hops(conn: sqlite3.Connection) -> dict[int, NextHop]:
    return {r[0]: NextHop(r[1], r[2], r[3]) for r in conn.execute(
        "SELECT id, delivery_type, domain, connector FROM delivery_queue")}


@dataclass(frozen=True, slots=True)
class QueueState:
    """What a delivery queue's worker needs to know before it takes a batch."""

    suspended: bool = False
    #: while the queue is in Retry (its next hop failed as a whole): its next attempt
    next_retry: float | None = None
    #: connection failures in a row; a queue that failed tries one batch at a time
    retry_count: int = 0


def queue_state(conn: sqlite3.Connection, queue_id: int) -> QueueState:
    row = shared(conn).execute("SELECT suspended, next_retry, retry_count FROM delivery_queue"
                       " WHERE id=?", (queue_id,)).fetchone()
    if row is None:
        return QueueState()
    return QueueState(bool(row[0]), row[1], int(row[2] or 0))


def queue_deferred(conn: sqlite3.Connection, queue_id: int, started: float, now: float,
                   error: str, delay: Callable[[int], float]) -> float:
    """The queue's next hop failed as a whole (DeferQueue): the queue goes to Retry.

    ``delay(n)`` is the wait after the n-th failure in a row. Returns the time of the
    queue's next attempt. A batch taken before another batch already put the queue in Retry
    failed in the same outage: it takes that retry time and is not counted again.
    """
    conn.execute("UPDATE delivery_queue SET last_retry=? WHERE id=?", (now, queue_id))
    with _SharedWrite(conn) as w:
        row = w.execute("SELECT retry_count, next_retry FROM delivery_queue WHERE id=?",
                        (queue_id,)).fetchone()
        count, current = (int(row[0] or 0), row[1]) if row else (0, None)
        if current is not None and current > started:
            w.execute("UPDATE delivery_queue SET last_error=?, attempt_by=NULL,"
                      " attempt_until=NULL WHERE id=?", (error, queue_id))
            return float(current)
        count += 1
        at = now + delay(count)
        w.execute("UPDATE delivery_queue SET retry_count=?, next_retry=?, last_retry=?,"
                  " last_error=?, attempt_by=NULL, attempt_until=NULL WHERE id=?",
                  (count, at, now, error, queue_id))
    return at


def take_attempt(conn: sqlite3.Connection, queue_id: int, worker: int, now: float,
                 hold: float) -> bool:
    """With several workers, after a queue's Retry: True for the one worker that makes the
    next attempt (the others wait for its outcome, so a next hop that is down sees one
    connection per retry from the server, not one per worker). The attempt is this
    worker's until ``queue_deferred``/``queue_attempted`` records its outcome, or for
    ``hold`` seconds if its worker dies (a restarted worker of the same number resumes it).
    """
    with _SharedWrite(conn) as w:
        taken = w.execute(
            "UPDATE delivery_queue SET attempt_by=?, attempt_until=? WHERE id=? AND"
            " (attempt_until IS NULL OR attempt_until<? OR attempt_by=?)",
            (worker, now + hold, queue_id, now, worker)).rowcount
    return taken > 0


def queue_attempted(conn: sqlite3.Connection, queue_id: int, now: float,
                    error: str | None) -> None:
    """The next hop answered (or failed every item for good): the queue leaves Retry.

    The shared state is written only when it changes (every batch would otherwise make
    the workers take turns at the shared database)."""
    conn.execute("UPDATE delivery_queue SET last_retry=?, last_error=? WHERE id=?",
                 (now, error, queue_id))
    db = shared(conn)
    clean = ("retry_count=0 AND next_retry IS NULL AND last_error IS ? AND"
             " attempt_until IS NULL")
    if db is not conn and db.execute(f"SELECT 1 FROM delivery_queue WHERE id=? AND {clean}",
                                     (queue_id, error)).fetchone() is not None:
        return
    with _SharedWrite(conn) as w:
        w.execute("UPDATE delivery_queue SET retry_count=0, next_retry=NULL, last_retry=?,"
                  " last_error=?, attempt_by=NULL, attempt_until=NULL WHERE id=?",
                  (now, error, queue_id))


def _flag(conn: sqlite3.Connection, name: str) -> bool:
    row = shared(conn).execute("SELECT suspended FROM queue_flag WHERE name=?", (name,)).fetchone()
    return bool(row and row[0])


def set_flag(conn: sqlite3.Connection, name: str, suspended: bool) -> None:
    with _SharedWrite(conn) as w:
        w.execute("INSERT OR REPLACE INTO queue_flag (name, suspended) VALUES (?,?)",
                  (name, int(suspended)))


def flag(conn: sqlite3.Connection, name: str) -> bool:
    return _flag(conn, name)


# -- state changes -----------------------------------------------------------------------


def set_in_flight(conn: sqlite3.Connection, ids: Sequence[int], value: bool) -> None:
    conn.executemany("UPDATE message SET in_flight=? WHERE id=?", [(int(value), i) for i in ids])


def release(conn: sqlite3.Connection, ids: Sequence[int], not_before: float | None) -> None:
    """Clear the in-flight mark; ``not_before`` holds a Submission item back until then."""
    conn.executemany("UPDATE message SET in_flight=0, not_before=? WHERE id=?",
                     [(not_before, i) for i in ids])


def record_intent(conn: sqlite3.Connection, intents: dict[int, str]) -> None:
    conn.executemany("UPDATE recipient SET drop_intent=? WHERE id=?",
                     [(name, rid) for rid, name in intents.items()])


@dataclass(slots=True)
class RecipientUpdate:
    """A new state for one recipient row."""

    id: int
    status: RecipientStatus
    queue_id: int | None = None
    address: str | None = None
    orcpt: str | None = None
    attempts: int | None = None
    last_response: str | None = None
    next_retry: float | None = None
    first_attempt: float | None = None
    delay_notified: bool | None = None
    clear_intent: bool = False


def update_recipients(conn: sqlite3.Connection, updates: Iterable[RecipientUpdate]) -> None:
    for u in updates:
        sets = ["status=?"]
        values: list[object] = [u.status.value]
        for column, value in (("queue", u.queue_id), ("address", u.address), ("orcpt", u.orcpt),
                              ("attempts", u.attempts), ("last_response", u.last_response),
                              ("first_attempt", u.first_attempt),
                              ("delay_notified", None if u.delay_notified is None
                               else int(u.delay_notified))):
            if value is not None:
                sets.append(f"{column}=?")
                values.append(value)
        sets.append("next_retry=?")
        values.append(u.next_retry)
        if u.clear_intent:
            sets.append("drop_intent=NULL")
        values.append(u.id)
        conn.execute(f"UPDATE recipient SET {', '.join(sets)} WHERE id=?", values)


def add_recipients(
    conn: sqlite3.Connection, message_id: int, recipients: Iterable[EnvelopeRecipient]
) -> list[int]:
    ids = []
    for r in recipients:
        cur = conn.execute(
            "INSERT INTO recipient (message, address, notify, orcpt, status) VALUES (?,?,?,?,?)",
            (message_id, r.address, _notify_text(r.notify), r.orcpt, S.SUBMITTED.value))
        assert cur.lastrowid is not None
        ids.append(cur.lastrowid)
    return ids


def set_message_state(conn: sqlite3.Connection, message_id: int, state: str) -> None:
    conn.execute("UPDATE message SET state=?, in_flight=0, suspect=0 WHERE id=?",
                 (state, message_id))


def finish_if_done(conn: sqlite3.Connection, message_id: int) -> bool:
    """Remove the message when no recipient is left to work on; True when removed."""
    row = conn.execute(
        "SELECT COUNT(*) FROM recipient WHERE message=? AND status NOT IN (?,?,?)",
        (message_id, S.DELIVERED.value, S.FAILED.value, S.EXPANDED.value)).fetchone()
    if row[0]:
        return False
    conn.execute("DELETE FROM recipient WHERE message=?", (message_id,))
    conn.execute("DELETE FROM message WHERE id=?", (message_id,))
    return True


def resubmit_recipients(conn: sqlite3.Connection, where: str, params: Sequence[object]) -> int:
    """Send matching recipients back to the categorizer (Retry-Queue -Resubmit, Unreachable);
    suspended items stay where they are until resumed."""
    where = f"m.state IN ('active','submitted') AND r.suspended=0 AND ({where})"
    ids = [r[0] for r in conn.execute(
        f"SELECT DISTINCT r.message FROM recipient r JOIN message m ON m.id=r.message"
        f" WHERE {where}", params)]
    cur = conn.execute(
        f"UPDATE recipient SET status='Submitted', queue=NULL, next_retry=NULL WHERE id IN"
        f" (SELECT r.id FROM recipient r JOIN message m ON m.id=r.message WHERE {where})",
        params)
    conn.executemany("UPDATE message SET state='submitted' WHERE id=?", [(i,) for i in ids])
    return cur.rowcount


# -- recovery ----------------------------------------------------------------------------


@dataclass(slots=True)
class Recovery:
    crashed: list[int]
    poisoned: list[int]


def recover(conn: sqlite3.Connection, poison_threshold: int, poison_enabled: bool) -> Recovery:
    """At start: messages that were being processed when the process died crashed once more.

    A message that reaches the poison threshold goes to Poison; the others are marked
    suspect and processed one at a time, so an innocent batch-mate is not blamed twice.
    """
    crashed = [r[0] for r in conn.execute("SELECT id FROM message WHERE in_flight=1")]
    poisoned = []
    for msg_id in crashed:
        count = conn.execute(
            "UPDATE message SET crash_count=crash_count+1, in_flight=0, suspect=1 WHERE id=?"
            " RETURNING crash_count", (msg_id,)).fetchone()[0]
        if poison_enabled and count >= poison_threshold:
            conn.execute("UPDATE message SET state='poison', suspended=1 WHERE id=?", (msg_id,))
            poisoned.append(msg_id)
    return Recovery(crashed, poisoned)


# -- queue views (Get-Queue, Get-Message) -------------------------------------------------

FINAL = ("Delivered", "Failed", "Expanded")
NAMED_QUEUES = ("Submission", "Unreachable", "Poison")


def item_clause(queue: str) -> tuple[str, list[object]]:
    """The SQL condition (on ``m`` and ``r``) for the recipients a queue holds.

    A message is one item in each queue that holds some of its recipients (a bifurcated
    message is an item in several delivery queues); a poisoned message is in Poison only.
    """
    if queue == "Submission":
        return "m.state='submitted' AND r.status='Submitted'", []
    if queue == "Unreachable":
        return "m.state<>'poison' AND r.status='Unreachable'", []
    if queue == "Poison":
        return "m.state='poison' AND r.status NOT IN ('Delivered','Failed','Expanded')", []
    return "m.state<>'poison' AND r.queue=? AND r.status IN ('Ready','Retry')", [int(queue)]


def queue_exists(conn: sqlite3.Connection, queue: str) -> bool:
    if queue in NAMED_QUEUES:
        return True
    return queue.isdigit() and shared(conn).execute(
        "SELECT 1 FROM delivery_queue WHERE id=?", (int(queue),)).fetchone() is not None


def queue_summary(conn: sqlite3.Connection, now: float | None = None,
                  active: Iterable[str] = ()) -> list[dict[str, object]]:
    """One row per queue: identity parts, status, message count, next retry, last error.

    ``active`` names the queues with a batch in progress (only the running pipeline knows).
    A delivery queue is Suspended, else Active, else Retry while it waits for its next
    attempt after its next hop failed (``queue_deferred``), else Ready. Messages deferred on
    their own (a 4xx to one recipient) are in Retry as messages (Get-Message), not the queue.
    """
    now = time.time() if now is None else now
    busy = set(active)
    out: list[dict[str, object]] = []
    submitted = conn.execute(
        "SELECT COUNT(*) FROM message WHERE state='submitted'").fetchone()[0]
    out.append({"queue": "Submission", "delivery_type": "Undefined", "next_hop": "Submission",
                "status": "Suspended" if _flag(conn, "Submission") else
                "Active" if "Submission" in busy else "Ready",
                "message_count": submitted, "next_retry": None, "last_error": None})
    counts: dict[int, int] = {}
    last_tried: dict[int, float | None] = {}
    for row in conn.execute(
        "SELECT q.id, q.last_retry, COUNT(DISTINCT r.message) AS n"
        " FROM delivery_queue q LEFT JOIN recipient r"
        " ON r.queue=q.id AND r.status IN ('Ready','Retry')"
        # a poisoned message shows in Poison only, not also in the queue it was taken from
        " AND r.message NOT IN (SELECT id FROM message WHERE state='poison')"
        " GROUP BY q.id"):
        counts[row["id"]], last_tried[row["id"]] = row["n"], row["last_retry"]
    # every queue of the server (the shared state), with this worker's messages in it
    for row in shared(conn).execute(
        "SELECT id, delivery_type, domain, connector, suspended, last_error, next_retry,"
        " retry_count, last_retry FROM delivery_queue ORDER BY id").fetchall():
        name = str(row["id"])
        in_retry = row["next_retry"] is not None and row["next_retry"] > now
        status = ("Suspended" if row["suspended"] else "Active" if name in busy else
                  "Retry" if in_retry else "Ready")
        out.append({"queue": name, "delivery_type": row["delivery_type"],
                    "next_hop": row["domain"], "connector": row["connector"], "status": status,
                    "message_count": counts.get(row["id"], 0),
                    "next_retry": row["next_retry"] if in_retry else None,
                    "last_retry": _latest(row["last_retry"], last_tried.get(row["id"])),
                    "retry_count": row["retry_count"],
                    "last_error": row["last_error"]})
    unreachable = conn.execute(
        "SELECT COUNT(DISTINCT message) FROM recipient WHERE status='Unreachable'"
        " AND message NOT IN (SELECT id FROM message WHERE state='poison')").fetchone()[0]
    out.append({"queue": "Unreachable", "delivery_type": "Unreachable", "next_hop": "Unreachable",
                "status": "Suspended" if _flag(conn, "Unreachable") else "Ready",
                "message_count": unreachable, "next_retry": None, "last_error": None})
    poison = conn.execute("SELECT COUNT(*) FROM message WHERE state='poison'").fetchone()[0]
    out.append({"queue": "Poison", "delivery_type": "Undefined", "next_hop": "Poison",
                "status": "Suspended", "message_count": poison, "next_retry": None,
                "last_error": None})
    return out


def _latest(*times: float | None) -> float | None:
    known = [t for t in times if t is not None]
    return max(known) if known else None


def queue_items(conn: sqlite3.Connection, queue: str, now: float,
                message_id: int | None = None, limit: int = 1000) -> list[dict[str, object]]:
    """Get-Message: one row per message the queue holds, with the recipients it holds."""
    clause, params = item_clause(queue)
    if message_id is not None:
        clause += " AND m.id=?"
        params = [*params, message_id]
    ids = [r[0] for r in conn.execute(
        f"SELECT DISTINCT m.id FROM message m JOIN recipient r ON r.message=m.id"
        f" WHERE {clause} ORDER BY m.id LIMIT ?", [*params, limit])]
    if not ids:
        return []
    held_until = None  # a delivery queue in Retry holds every item until its next attempt
    if queue.isdigit():
        row = shared(conn).execute("SELECT next_retry FROM delivery_queue WHERE id=?",
                           (int(queue),)).fetchone()
        if row and row[0] is not None and row[0] > now:
            held_until = float(row[0])
    marks = ",".join("?" * len(ids))
    rows = conn.execute(
        f"SELECT m.id, m.message_id, m.sender, m.subject, m.size, m.source, m.received_at,"
        f" m.expires_at, m.suspended AS m_suspended, m.in_flight, m.not_before,"
        f" r.address, r.status, r.last_response, r.next_retry, r.suspended AS r_suspended,"
        f" r.attempts FROM message m JOIN recipient r ON r.message=m.id"
        f" WHERE m.id IN ({marks}) AND {clause} ORDER BY m.id, r.id", [*ids, *params])
    items: dict[int, dict[str, object]] = {}
    recipients: dict[int, list[dict[str, object]]] = {}  # each item's list, typed
    for row in rows:
        if row["id"] not in items:
            recipients[row["id"]] = []
            items[row["id"]] = {
                "queue": queue, "message": row["id"], "message_id": row["message_id"],
                "from": row["sender"], "subject": row["subject"], "size": row["size"],
                "source": row["source"], "received": row["received_at"],
                "expires": row["expires_at"], "_m": row, "recipients": recipients[row["id"]]}
        recipients[row["id"]].append({
            "address": row["address"], "status": row["status"],
            "suspended": bool(row["r_suspended"]), "attempts": row["attempts"],
            "last_error": row["last_response"], "next_retry": row["next_retry"]})
    return [_finish_item(item, queue, now, held_until) for item in items.values()]


def _finish_item(item: dict[str, object], queue: str, now: float,
                 held_until: float | None = None) -> dict[str, object]:
    """Status, last error and next retry of one queued item from its recipients (and from
    its queue: in a queue in Retry, ``held_until`` is the queue's next attempt)."""
    m = item.pop("_m")
    recipients: list[dict[str, object]] = item["recipients"]  # type: ignore[assignment]
    waiting = [r for r in recipients if not r["suspended"]]
    retries = [float(r["next_retry"]) for r in waiting  # type: ignore[arg-type]
               if r["status"] == "Retry" and r["next_retry"] is not None]
    due = any(r["status"] != "Retry" or r["next_retry"] is None
              or float(r["next_retry"]) <= now for r in waiting)  # type: ignore[arg-type]
    if queue == "Poison" or m["m_suspended"] or not waiting:  # type: ignore[index]
        status = "Suspended"
    elif m["in_flight"]:  # type: ignore[index]
        status = "Active"
    elif queue == "Submission":
        not_before = m["not_before"]  # type: ignore[index]
        status = "Retry" if not_before and not_before > now else "Ready"
    elif held_until is not None:
        status = "Retry"
    elif queue == "Unreachable" or due:
        status = "Ready"
    else:
        status = "Retry"
    errors = [r["last_error"] for r in recipients if r["last_error"]]
    item["status"] = status
    item["last_error"] = errors[-1] if errors else None
    own = min(retries) if retries and not due else None
    if status != "Retry":
        item["next_retry"] = None
    elif held_until is not None:
        item["next_retry"] = max(held_until, own if own is not None else held_until)
    else:
        item["next_retry"] = own
    return item


def message_exists(conn: sqlite3.Connection, queue: str, message_id: int) -> bool:
    clause, params = item_clause(queue)
    return conn.execute(
        f"SELECT 1 FROM message m JOIN recipient r ON r.message=m.id WHERE {clause}"
        " AND m.id=? LIMIT 1", [*params, message_id]).fetchone() is not None


def item_in_flight(conn: sqlite3.Connection, message_id: int) -> bool:
    row = conn.execute("SELECT in_flight FROM message WHERE id=?", (message_id,)).fetchone()
    return bool(row and row[0])


def item_recipients(conn: sqlite3.Connection, queue: str, message_id: int,
                    with_data: bool = False) -> QueuedMessage | None:
    """The message with only the recipients this queue holds (None when it holds none)."""
    clause, params = item_clause(queue)
    ids = [r[0] for r in conn.execute(
        f"SELECT r.id FROM message m JOIN recipient r ON r.message=m.id WHERE {clause}"
        " AND m.id=?", [*params, message_id])]
    if not ids:
        return None
    marks = ",".join("?" * len(ids))
    found = load_messages(conn, [message_id], with_data=with_data,
                          recipient_filter=f"r.id IN ({marks})", params=ids)
    return found[0] if found else None


def item_suspended(conn: sqlite3.Connection, queue: str, message_id: int) -> bool:
    """True when the item is held: Poison, a suspended message, or all its recipients."""
    if queue == "Poison":
        return True
    clause, params = item_clause(queue)
    row = conn.execute(
        f"SELECT MAX(m.suspended), MIN(r.suspended) FROM message m JOIN recipient r"
        f" ON r.message=m.id WHERE {clause} AND m.id=?", [*params, message_id]).fetchone()
    return bool(row and (row[0] or row[1]))


def set_item_suspended(conn: sqlite3.Connection, queue: str, message_id: int,
                       suspended: bool) -> int:
    """Suspend-/Resume-Message. A Submission item is the whole message (the categorizer
    takes messages); a delivery or Unreachable item is the recipients that queue holds, so a
    bifurcated message's other queues go on delivering."""
    if queue == "Submission":
        return conn.execute("UPDATE message SET suspended=? WHERE id=? AND state='submitted'",
                            (int(suspended), message_id)).rowcount
    clause, params = item_clause(queue)
    changed = conn.execute(
        f"UPDATE recipient SET suspended=? WHERE id IN (SELECT r.id FROM message m JOIN"
        f" recipient r ON r.message=m.id WHERE {clause} AND m.id=?)",
        [int(suspended), *params, message_id]).rowcount
    if not suspended:  # a message suspended as a whole (before a resubmission) is freed too
        conn.execute("UPDATE message SET suspended=0 WHERE id=? AND state<>'poison'",
                     (message_id,))
    return changed


def release_poison(conn: sqlite3.Connection, message_id: int) -> int:
    """Resume-Message on Poison: the message goes back to the categorizer, still suspect
    (processed alone; one more crash sends it back to Poison)."""
    changed = conn.execute(
        "UPDATE recipient SET status='Submitted', queue=NULL, next_retry=NULL, suspended=0"
        " WHERE message=? AND status NOT IN ('Delivered','Failed','Expanded')",
        (message_id,)).rowcount
    conn.execute("UPDATE message SET state='submitted', suspended=0, suspect=1, not_before=NULL"
                 " WHERE id=? AND state='poison'", (message_id,))
    return changed


def set_queue_suspended(conn: sqlite3.Connection, queue: str, suspended: bool) -> None:
    if queue in ("Submission", "Unreachable"):
        set_flag(conn, queue, suspended)
    else:
        with _SharedWrite(conn) as w:
            w.execute("UPDATE delivery_queue SET suspended=? WHERE id=?",
                      (int(suspended), int(queue)))


def retry_pending(conn: sqlite3.Connection, queue_id: int, now: float) -> bool:
    """True when messages of the queue wait on their own retry time (a per-message 4xx)."""
    return conn.execute(
        "SELECT 1 FROM recipient WHERE queue=? AND status='Retry' AND suspended=0"
        " AND next_retry>? LIMIT 1", (queue_id, now)).fetchone() is not None


def retry_now(conn: sqlite3.Connection, queue_id: int, now: float) -> int:
    """Retry-Queue: the queue leaves Retry and every waiting item of it is due now (its
    retry count stays: a failing forced attempt goes on along the retry ladder)."""
    with _SharedWrite(conn) as w:
        w.execute("UPDATE delivery_queue SET next_retry=NULL WHERE id=?", (queue_id,))
    return conn.execute(
        "UPDATE recipient SET next_retry=? WHERE queue=? AND status='Retry' AND suspended=0"
        " AND next_retry>?", (now, queue_id, now)).rowcount


def settle_submitted(conn: sqlite3.Connection, message_id: int) -> None:
    """A message left in Submission with none of its recipients there is active again."""
    conn.execute(
        "UPDATE message SET state='active' WHERE id=? AND state='submitted' AND NOT EXISTS"
        " (SELECT 1 FROM recipient WHERE message=? AND status='Submitted')",
        (message_id, message_id))


def dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def envelope_of(message: QueuedMessage, recipients: Iterable[QueuedRecipient]) -> Envelope:
    return Envelope(message.mail_from, [
        EnvelopeRecipient(r.address, r.notify, r.orcpt) for r in recipients])
