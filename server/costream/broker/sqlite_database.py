"""The SQLite file behind the embedded broker: its directory, lock, schema and one writer.

A data directory holds ``costream.db`` (with its ``-wal`` and ``-shm`` companions) and
``costream.lock``. :meth:`Database.open` takes an exclusive ``flock`` on the lock file, so
one process owns a data directory; a second one fails at start with :class:`DataDirError`,
as does a file that is not a readable costream database. Nothing ever starts afresh over
old data silently.

Every statement runs on one thread, the writer, in the order submitted. It takes all jobs
queued at once into one transaction and commits them together (group commit), then
hands each job's result back to the event loop. Reads go through the same thread, so a read
sees every write submitted before it. The journal is in WAL mode with
``synchronous=NORMAL``: a commit is in the file once it returns, so it survives the process
being killed (SIGKILL); only a power cut or an OS crash may lose the last commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from costream.errors import DataDirError, StorageUnavailable

log = logging.getLogger(__name__)

DATABASE_NAME = "costream.db"
LOCK_NAME = "costream.lock"
SCHEMA_VERSION = 2  # 2: conversations.last_active
_MAX_BATCH = 1000  # jobs per transaction: bounds the time a commit keeps results waiting

_SCHEMA = """
CREATE TABLE conversations (
    id TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    head INTEGER NOT NULL,
    fence INTEGER NOT NULL,
    snapshot BLOB,
    snapshot_seq INTEGER NOT NULL,
    run_id TEXT,
    run_fence INTEGER,
    run_start_seq INTEGER,
    last_active REAL NOT NULL DEFAULT 0
);
CREATE INDEX conversations_by_activity ON conversations (last_active);
CREATE TABLE records (
    conversation_id TEXT NOT NULL,
    field TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (conversation_id, field)
) WITHOUT ROWID;
CREATE TABLE log (
    conversation_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    frame BLOB NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
CREATE TABLE maps (
    conversation_id TEXT NOT NULL,
    name TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (conversation_id, name, key)
);
CREATE TABLE lists (
    position INTEGER PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value BLOB NOT NULL
);
CREATE INDEX lists_in_order ON lists (conversation_id, name, position);
"""
# Version 1 had no last_active: its conversations count as active at the upgrade.
_FROM_VERSION_1 = """ALTER TABLE conversations ADD COLUMN last_active REAL NOT NULL DEFAULT 0;
UPDATE conversations SET last_active = {now!r};
CREATE INDEX conversations_by_activity ON conversations (last_active);"""

Statement = tuple[str, Sequence[Sequence[Any]]]
"""SQL and its rows of parameters (``executemany``)."""

Job = Callable[[sqlite3.Connection], Any]
Done = Callable[[Any], None]
"""Called on the event loop with a job's result, or the ``StorageUnavailable`` it raised."""


@dataclass
class StoredRun:
    run_id: str
    fence: int
    start_seq: int


@dataclass
class StoredConversation:
    """One conversation as the file holds it."""

    epoch: str
    head: int
    fence: int
    snapshot: bytes | None
    snapshot_seq: int
    run: StoredRun | None
    record: dict[str, bytes] = field(default_factory=dict)
    log: list[tuple[int, bytes]] = field(default_factory=list)
    maps: dict[str, dict[str, bytes]] = field(default_factory=dict)
    lists: dict[str, list[bytes]] = field(default_factory=dict)


class Database:
    """A data directory's database, written by one thread. See the module docstring."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / DATABASE_NAME
        self._lock_fd: int | None = None
        self._connection: sqlite3.Connection | None = None
        self._jobs: queue.SimpleQueue[tuple[Job, Done] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed = False

    @property
    def is_open(self) -> bool:
        return self._connection is not None

    # ---- opening ---------------------------------------------------------------------
    def open(self) -> list[str]:
        """Lock the directory, open or create the database; returns the ids of the
        conversations that had a run open when the last process stopped."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DataDirError(
                f"cannot create the data directory {self.data_dir}: {error.strerror}"
            ) from None
        self._lock()
        try:
            self._connection = self._connect()
            return [
                row[0]
                for row in self._connection.execute(
                    "SELECT id FROM conversations WHERE run_id IS NOT NULL"
                )
            ]
        except sqlite3.DatabaseError as error:
            self._unlock()
            raise DataDirError(
                f"cannot read the database {self.path}: {error}. It was left as it is: "
                "restore it from a backup, or move it away to start afresh (its "
                "conversations are then gone)"
            ) from None
        except DataDirError:
            self._unlock()
            raise

    def _lock(self) -> None:
        lock_path = self.data_dir / LOCK_NAME
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise DataDirError(f"cannot open {lock_path}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirError(
                f"the data directory {self.data_dir} is in use by another costream "
                f"process (pid {holder}). One process serves a data directory: to run "
                "several, share conversations through Redis (--redis-url), or give each "
                "its own --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: the writer says BEGIN and COMMIT itself, one per batch.
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            # The first statement reads the header: a file that is not a database fails here.
            connection.execute("PRAGMA journal_mode=WAL").fetchone()
            connection.execute("PRAGMA synchronous=NORMAL")
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise DataDirError(
                    f"the database {self.path} was written by a newer costream "
                    f"(schema {version}, this one knows {SCHEMA_VERSION}); upgrade costream"
                )
            if version == 0:
                connection.executescript(
                    f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )
            elif version == 1:
                steps = _FROM_VERSION_1.format(now=time.time())
                connection.executescript(f"BEGIN; {steps} PRAGMA user_version = 2; COMMIT;")
        except BaseException:
            connection.close()
            raise
        return connection

    # ---- the writer ------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the writer thread; results are handed back on ``loop``."""
        if self._thread is not None:
            return
        self._loop = loop
        # A daemon: a process that ends without close() (a failed start) must not hang on
        # it; SQLite rolls back a transaction the thread did not finish.
        self._thread = threading.Thread(
            target=self._write_loop, name="costream-sqlite", daemon=True
        )
        self._thread.start()

    def submit(self, job: Job, done: Done) -> None:
        """Run ``job`` on the writer, in order; ``done`` gets its result after the commit."""
        if self._thread is None:
            raise StorageUnavailable("the database is closed")
        self._jobs.put((job, done))

    async def close(self) -> None:
        """Commit what was submitted, stop the writer, close the file, release the lock."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(thread.join)
        self._unlock()

    def _write_loop(self) -> None:
        assert self._connection is not None
        connection = self._connection
        stopping = False
        while not stopping:
            batch: list[tuple[Job, Done]] = []
            item = self._jobs.get()
            while item is not None:
                batch.append(item)
                if len(batch) >= _MAX_BATCH:
                    break
                try:
                    item = self._jobs.get_nowait()
                except queue.Empty:
                    break
            stopping = item is None
            if batch:
                self._hand_back(batch, self._run_batch(connection, batch))
        with contextlib.suppress(sqlite3.Error):
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _run_batch(
        self, connection: sqlite3.Connection, batch: list[tuple[Job, Done]]
    ) -> list[Any]:
        if self.failed:
            return [StorageUnavailable("the database failed earlier")] * len(batch)
        try:
            connection.execute("BEGIN")
            results = [job(connection) for job, _ in batch]
            connection.execute("COMMIT")
            return results
        except sqlite3.Error:
            # The memory state already holds what failed to reach the file: from now on
            # every call fails, rather than serve what a restart would not find.
            log.exception("writing %s failed; the embedded broker stops", self.path)
            self.failed = True
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            return [StorageUnavailable("the database could not be written")] * len(batch)

    def _hand_back(self, batch: list[tuple[Job, Done]], results: list[Any]) -> None:
        assert self._loop is not None

        def deliver() -> None:
            for (_, done), result in zip(batch, results, strict=True):
                try:
                    done(result)
                except Exception:  # one listener's failure must not starve the others
                    log.exception("handing back a database result failed")

        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            self._loop.call_soon_threadsafe(deliver)


# ---- statements and reads, run on the writer ---------------------------------------------


def execute(statements: Sequence[Statement]) -> Job:
    """A job that runs these statements."""

    def job(connection: sqlite3.Connection) -> None:
        for sql, rows in statements:
            connection.executemany(sql, rows)

    return job


def insert_conversation(conversation_id: str, epoch: str) -> Statement:
    return (
        "INSERT INTO conversations (id, epoch, head, fence, snapshot_seq) VALUES (?, ?, 0, 0, 0)",
        [(conversation_id, epoch)],
    )


def set_last_active(active: Sequence[tuple[str, float]]) -> Statement:
    """(conversation id, time.time() of its last activity) for each."""
    return (
        "UPDATE conversations SET last_active = ? WHERE id = ?",
        [(at, conversation_id) for conversation_id, at in active],
    )


def delete_conversations(ids: Sequence[str]) -> list[Statement]:
    """Everything the file holds of these conversations."""
    if not ids:
        return []
    rows: list[tuple[str]] = [(conversation_id,) for conversation_id in ids]
    tables = ("records", "log", "maps", "lists")
    statements: list[Statement] = [("DELETE FROM conversations WHERE id = ?", rows)]
    return statements + [
        (f"DELETE FROM {table} WHERE conversation_id = ?", rows) for table in tables
    ]


def idle_conversations(before: float, limit: int) -> Job:
    """A job that lists up to ``limit`` conversations with no run, last active before
    ``before``, the least recently active first."""
    sql = "SELECT id FROM conversations WHERE last_active < ? AND run_id IS NULL "
    sql += "ORDER BY last_active LIMIT ?"
    return lambda connection: [row[0] for row in connection.execute(sql, (before, limit))]


def set_fields(conversation_id: str, fields: dict[str, bytes]) -> Statement:
    return (
        "INSERT OR REPLACE INTO records (conversation_id, field, value) VALUES (?, ?, ?)",
        [(conversation_id, name, value) for name, value in fields.items()],
    )


def map_set(conversation_id: str, name: str, key: str, value: bytes) -> Statement:
    return (
        "INSERT OR REPLACE INTO maps (conversation_id, name, key, value) VALUES (?, ?, ?, ?)",
        [(conversation_id, name, key, value)],
    )


def map_delete(conversation_id: str, name: str, key: str) -> Statement:
    return (
        "DELETE FROM maps WHERE conversation_id = ? AND name = ? AND key = ?",
        [(conversation_id, name, key)],
    )


def list_append(conversation_id: str, name: str, items: Sequence[bytes]) -> Statement:
    return (
        "INSERT INTO lists (conversation_id, name, value) VALUES (?, ?, ?)",
        [(conversation_id, name, item) for item in items],
    )


def log_append(conversation_id: str, frames: Sequence[tuple[int, bytes]]) -> Statement:
    return (
        "INSERT INTO log (conversation_id, seq, frame) VALUES (?, ?, ?)",
        [(conversation_id, seq, frame) for seq, frame in frames],
    )


def log_trim(conversation_id: str, first_kept: int) -> Statement:
    return (
        "DELETE FROM log WHERE conversation_id = ? AND seq < ?",
        [(conversation_id, first_kept)],
    )


def set_state(conversation_id: str, head: int, fence: int, run: StoredRun | None) -> Statement:
    return (
        "UPDATE conversations SET head = ?, fence = ?, run_id = ?, run_fence = ?, "
        "run_start_seq = ? WHERE id = ?",
        [
            (
                head,
                fence,
                run and run.run_id,
                run and run.fence,
                run and run.start_seq,
                conversation_id,
            )
        ],
    )


def set_snapshot(conversation_id: str, snapshot: bytes | None, snapshot_seq: int) -> Statement:
    return (
        "UPDATE conversations SET snapshot = ?, snapshot_seq = ? WHERE id = ?",
        [(snapshot, snapshot_seq, conversation_id)],
    )


def load_conversation(conversation_id: str) -> Job:
    """A job that reads one conversation whole (None: there is none)."""

    def job(connection: sqlite3.Connection) -> StoredConversation | None:
        row = connection.execute(
            "SELECT epoch, head, fence, snapshot, snapshot_seq, run_id, run_fence, "
            "run_start_seq FROM conversations WHERE id = ?",
            (conversation_id,),
        ).fetchone()
        if row is None:
            return None
        epoch, head, fence, snapshot, snapshot_seq, run_id, run_fence, run_start_seq = row
        run = None if run_id is None else StoredRun(run_id, run_fence, run_start_seq)
        stored = StoredConversation(epoch, head, fence, snapshot, snapshot_seq, run)
        where = (conversation_id,)
        stored.record = dict(
            connection.execute("SELECT field, value FROM records WHERE conversation_id = ?", where)
        )
        stored.log = connection.execute(
            "SELECT seq, frame FROM log WHERE conversation_id = ? ORDER BY seq", where
        ).fetchall()
        for name, key, value in connection.execute(
            "SELECT name, key, value FROM maps WHERE conversation_id = ?", where
        ):
            stored.maps.setdefault(name, {})[key] = value
        for name, value in connection.execute(
            "SELECT name, value FROM lists WHERE conversation_id = ? ORDER BY name, position",
            where,
        ):
            stored.lists.setdefault(name, []).append(value)
        return stored

    return job
