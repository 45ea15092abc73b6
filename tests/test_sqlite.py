"""The SQLite broker beyond the shared contract: what survives closing and reopening the
data directory, one process per directory, unreadable files, memory, and the command line.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from costream import protocol
from costream.broker.sqlite import SqliteBroker
from costream.broker.sqlite_database import DATABASE_NAME, SCHEMA_VERSION
from costream.errors import DataDirError, RunTooLarge
from tests.support.processes import free_port
from tests.support.servers import ServerProcess
from tests.support.ws import create_conversation
from tests.test_broker import (
    LONG_TTL_MS,
    Listener,
    delta,
    new_conversation,
    run_finished,
    run_started,
    seqs,
    snapshot_body,
    start,
)
from tests.test_retention import large_delta

OpenSqlite = Callable[..., Awaitable[SqliteBroker]]


@pytest.fixture
async def opened(tmp_path: Path) -> AsyncIterator[OpenSqlite]:
    """A factory of started SqliteBrokers on ``tmp_path/data``; all closed after the test."""
    brokers: list[SqliteBroker] = []

    async def open_(
        log_retain: int = 10_000, listener: Listener | None = None, **limits: Any
    ) -> SqliteBroker:
        broker = SqliteBroker(tmp_path / "data", log_retain=log_retain, **limits)
        listener = listener or Listener()
        await broker.start(listener.on_frame, listener.on_resync)
        brokers.append(broker)
        return broker

    yield open_
    for broker in brokers:
        await broker.close()


async def test_everything_survives_closing_and_reopening(opened: OpenSqlite) -> None:
    """Record, totals, maps, lists, the trimmed log, snapshot, epoch and fence read back the
    same from a new broker on the directory, and seq goes on from the head."""
    broker = await opened(log_retain=5)
    conversation_id = await new_conversation(broker)
    await broker.update_record(conversation_id, {"title": b"kept"})
    await broker.add_to_record(conversation_id, "cost_usd", 0.25)
    await broker.map_set(conversation_id, "files", "a.txt", b"A")
    await broker.map_set(conversation_id, "files", "b.txt", b"B")
    await broker.map_delete(conversation_id, "files", "b.txt")
    await broker.list_append(conversation_id, "history", [b"1", b"2"])
    lease = await start(broker, conversation_id)
    await broker.append(lease, [delta(n) for n in range(9)])
    await broker.finish_run(lease, [run_finished(conversation_id)], snapshot_body("kept"))
    before = (
        await broker.get_record(conversation_id),
        await broker.log_state(conversation_id),
        await broker.read_log(conversation_id, 0, 100),
        await broker.read_snapshot(conversation_id),
    )
    await broker.close()

    reopened = await opened(log_retain=5)
    after = (
        await reopened.get_record(conversation_id),
        await reopened.log_state(conversation_id),
        await reopened.read_log(conversation_id, 0, 100),
        await reopened.read_snapshot(conversation_id),
    )
    assert after == before
    assert seqs(after[2]) == [7, 8, 9, 10, 11]
    assert await reopened.map_all(conversation_id, "files") == {"a.txt": b"A"}
    assert await reopened.list_all(conversation_id, "history") == [b"1", b"2"]
    assert await reopened.add_to_record(conversation_id, "cost_usd", 0.5) == 0.75
    second = await reopened.start_run(conversation_id, "run-2", run_started(conversation_id), 1000)
    assert second.fence > lease.fence
    assert (await reopened.log_state(conversation_id)).head == 12  # type: ignore[union-attr]


async def test_a_run_open_at_close_is_interrupted_and_can_be_taken_over(opened: OpenSqlite) -> None:
    """A run the last process left open is listed, its lease reads expired, and taking it
    over fences the old producer out."""
    broker = await opened()
    conversation_id = await new_conversation(broker)
    stale = await start(broker, conversation_id, ttl_ms=LONG_TTL_MS)
    await broker.append(stale, [delta(1)])
    await broker.close()

    reopened = await opened()
    assert reopened.interrupted_runs() == [conversation_id]
    active = await reopened.active_run(conversation_id)
    assert active is not None and (active.run_id, active.start_seq) == ("run-1", 1)
    assert not active.lease_alive
    successor = await reopened.take_over_run(conversation_id, LONG_TTL_MS)
    assert successor is not None and successor.fence > stale.fence
    assert await reopened.finish_run(successor, [run_finished(conversation_id)], None) == 3
    await reopened.close()
    assert (await opened()).interrupted_runs() == []


async def test_frames_reach_viewers_only_once_committed_to_the_file(
    opened: OpenSqlite,
    tmp_path: Path,
) -> None:
    """When a frame is published, another connection already reads it from the file: a
    viewer never sees what a killed process would lose."""
    database = tmp_path / "data" / DATABASE_NAME
    on_disk_when_published: list[bool] = []

    class CheckingListener(Listener):
        def on_frame(self, conversation_id: str, frame: bytes) -> None:
            if protocol.is_logged_frame(frame):
                with sqlite3.connect(database) as reader:
                    (count,) = reader.execute(
                        "SELECT count(*) FROM log WHERE conversation_id = ? AND seq = ?",
                        (conversation_id, protocol.seq_of(frame)),
                    ).fetchone()
                on_disk_when_published.append(count == 1)
            super().on_frame(conversation_id, frame)

    listener = CheckingListener()
    broker = await opened(listener=listener)
    conversation_id = await new_conversation(broker)
    await broker.subscribe(conversation_id)
    lease = await start(broker, conversation_id)
    for n in range(20):
        await broker.append(lease, [delta(n)])
    await listener.until(lambda: len(listener.logged(conversation_id)) == 21)
    assert on_disk_when_published == [True] * 21


async def test_an_idle_conversation_leaves_memory_and_comes_back_the_same(
    opened: OpenSqlite,
) -> None:
    """evict_idle drops what nobody uses (never a watched one) and reloads it on demand."""
    broker = await opened()
    idle, watched = await new_conversation(broker), await new_conversation(broker)
    await broker.subscribe(watched)
    lease = await start(broker, idle)
    await broker.finish_run(lease, [run_finished(idle)], snapshot_body())
    log = await broker.read_log(idle, 0, 100)
    assert broker.evict_idle(idle_s=0) == 1
    assert await broker.read_log(idle, 0, 100) == log
    assert (await broker.log_state(idle)).head == 2  # type: ignore[union-attr]
    assert await broker.get_record(watched) is not None


async def test_byte_retention_and_the_run_budget_hold_across_a_reopen(opened: OpenSqlite) -> None:
    """The bytes of finished runs and of the open run are counted again from the file: a
    reopened broker still trims to log_retain_bytes and still refuses a run past
    max_run_bytes."""
    kib = 1024
    broker = await opened(log_retain_bytes=64 * kib, max_run_bytes=50 * kib)
    conversation_id = await new_conversation(broker)
    lease = await start(broker, conversation_id)
    await broker.append(lease, [large_delta(n, 15 * kib) for n in range(3)])  # 2..4
    await broker.finish_run(lease, [run_finished(conversation_id)], snapshot_body())  # 5
    assert seqs(await broker.read_log(conversation_id, 0, 100)) == [1, 2, 3, 4, 5]
    await broker.close()

    reopened = await opened(log_retain_bytes=64 * kib, max_run_bytes=50 * kib)
    lease = await reopened.start_run(conversation_id, "run-2", run_started(conversation_id), 1000)
    await reopened.append(lease, [large_delta(n, 15 * kib) for n in range(3)])  # 7..9
    await reopened.close()  # the run left open

    last = await opened(log_retain_bytes=64 * kib, max_run_bytes=50 * kib)
    taken = await last.take_over_run(conversation_id, LONG_TTL_MS)
    assert taken is not None
    with pytest.raises(RunTooLarge):
        await last.append(taken, [large_delta(9, 15 * kib)])
    await last.finish_run(taken, [run_finished(conversation_id)], snapshot_body())  # 10
    frames = await last.read_log(conversation_id, 0, 100)
    assert sum(map(len, frames)) <= 64 * kib and seqs(frames)[-1] == 10
    assert seqs(frames)[0] > 1  # the first run's oldest events are gone


async def test_a_version_1_database_is_upgraded_and_its_conversations_kept(
    opened: OpenSqlite, tmp_path: Path
) -> None:
    """A data directory of schema 1 (no last_active) opens: its conversations count as
    active from the upgrade, so a TTL longer than the time since keeps them."""
    broker = await opened()
    conversation_id = await new_conversation(broker)
    await broker.close()
    database = tmp_path / "data" / DATABASE_NAME
    with sqlite3.connect(database) as old:
        old.execute("DROP INDEX conversations_by_activity")
        old.execute("ALTER TABLE conversations DROP COLUMN last_active")
        old.execute("PRAGMA user_version = 1")
    upgraded = await opened(conversation_ttl_s=3600)
    assert await upgraded.expire_idle(100) == 0
    assert await upgraded.get_record(conversation_id) is not None
    with sqlite3.connect(database) as reader:
        assert reader.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


async def test_a_second_process_on_the_directory_is_refused_pointing_to_redis(
    opened: OpenSqlite,
    tmp_path: Path,
) -> None:
    """The data directory's lock refuses a second owner with a message naming the
    directory and --redis-url; once the first closes, the directory opens again."""
    first = await opened()
    second = SqliteBroker(tmp_path / "data")
    with pytest.raises(DataDirError) as refused:
        second.open()
    assert str(tmp_path / "data") in str(refused.value)
    assert "--redis-url" in str(refused.value)
    await first.close()
    await opened()


def test_an_unreadable_database_stops_the_start_naming_the_file(tmp_path: Path) -> None:
    """A file that is not a database, or one from a newer costream, is refused, left as it
    was, and named in the error; nothing starts afresh over it."""
    data = tmp_path / "data"
    data.mkdir()
    database = data / DATABASE_NAME
    database.write_bytes(b"this is not a database, but it was someone's data" * 100)
    with pytest.raises(DataDirError) as refused:
        SqliteBroker(data).open()
    assert str(database) in str(refused.value)
    assert database.read_bytes().startswith(b"this is not a database")
    database.unlink()
    with sqlite3.connect(database) as newer:
        newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(DataDirError, match="newer costream"):
        SqliteBroker(data).open()


# ---- the command line -----------------------------------------------------------------


def serve_fails(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``costream serve`` that must stop at once; its result."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("COSTREAM_", "REDIS_"))}
    command = [sys.executable, "-m", "costream.cli", "serve", "--port", str(free_port()), *args]
    return subprocess.run(
        command, env={**full_env, **env}, capture_output=True, text=True, timeout=60
    )


def test_serve_refuses_a_data_directory_in_use_and_workers_without_redis(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A second ``costream serve`` on a directory in use, and ``--workers`` without Redis,
    exit 2 at start with a message that points to --redis-url."""
    env = {"COSTREAM_DATA_DIR": str(tmp_path / "data")}
    start_server(env=env)
    second = serve_fails(env)
    assert second.returncode == 2, second.stderr
    assert "in use by another costream process" in second.stderr
    assert "--redis-url" in second.stderr and "Traceback" not in second.stderr
    workers = serve_fails({"COSTREAM_DATA_DIR": str(tmp_path / "other")}, "--workers", "2")
    assert workers.returncode == 2 and "--redis-url" in workers.stderr


def test_serve_refuses_an_unreadable_database(tmp_path: Path) -> None:
    """``costream serve`` on a corrupt database exits 2 naming the file."""
    data = tmp_path / "data"
    data.mkdir()
    (data / DATABASE_NAME).write_bytes(b"\0garbage" * 1000)
    result = serve_fails({"COSTREAM_DATA_DIR": str(data)})
    assert result.returncode == 2
    assert str(data / DATABASE_NAME) in result.stderr and "Traceback" not in result.stderr


async def test_serve_memory_keeps_nothing_on_disk(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """``--memory`` serves conversations without creating the data directory."""
    data = tmp_path / "data"
    server = start_server(env={"COSTREAM_DATA_DIR": str(data)}, args=["--memory"])
    await create_conversation(server.url, title="throwaway")
    assert not data.exists()
    assert "--memory" in server.log_text()
