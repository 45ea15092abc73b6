"""Writes a run retries through a storage outage count once (issue 10): the history, the
totals and workspace files. A write whose answer was lost after it was applied is sent
again (``agent.storage.durably``); the store makes the second one harmless.

The history case runs the real server on real Redis behind a relay that drops the answer
to the history write; the others wrap the broker at its call boundary: the call is applied,
then its answer is "lost" (``StorageUnavailable``), once per method.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from costream import lifecycle
from costream.agent.storage import durably
from costream.agent.tools import Workspace
from costream.broker.memory import MemoryBroker
from costream.errors import StorageUnavailable
from costream.lifecycle import RunEnd
from costream.protocol import SnapshotMessage, Usage
from costream.store import Store
from tests.support.llm_server import LLMServer, content, finish, stream, text, usage
from tests.support.proxy import LosingRelay
from tests.support.redis import RedisServer
from tests.support.ws import create_conversation, open_session
from tests.test_runner import StartServer, llm_env


class AnswerLosingBroker(MemoryBroker):
    """A memory broker whose first call of each of ``methods`` is applied and then fails
    as if Redis died before answering."""

    def __init__(self, *methods: str) -> None:
        super().__init__()
        self.to_lose = set(methods)
        self.lost: list[str] = []

    def _lose(self, name: str) -> None:
        if name in self.to_lose:
            self.to_lose.discard(name)
            self.lost.append(name)
            raise StorageUnavailable("answer lost")

    async def list_append(self, conversation_id: str, name: str, items: Any) -> None:
        await super().list_append(conversation_id, name, items)
        self._lose("list_append")

    async def map_set(self, conversation_id: str, name: str, key: str, value: bytes) -> None:
        await super().map_set(conversation_id, name, key, value)
        self._lose("map_set")

    async def add_to_record(self, conversation_id: str, field: str, amount: float) -> float:
        value = await super().add_to_record(conversation_id, field, amount)
        self._lose("add_to_record")
        return value


async def _conversation(store: Store) -> str:
    created = await store.create(title="t", model="m", system="")
    return created.conversation.id


async def test_a_history_append_retried_after_its_answer_was_lost_is_read_once() -> None:
    """Two messages appended, the answer lost, the append retried: the history holds
    each once, in order."""
    broker = AnswerLosingBroker("list_append")
    store = Store(broker)
    conversation_id = await _conversation(store)
    messages = [
        SnapshotMessage(id="a1", role="assistant", content="one"),
        SnapshotMessage(id="t1", role="tool", content="two", tool_call_id="c1"),
    ]
    await durably(functools.partial(store.append_messages, conversation_id, messages))
    assert broker.lost == ["list_append"]
    assert await store.messages(conversation_id) == messages


async def test_a_run_total_retried_after_its_answer_was_lost_counts_once() -> None:
    """A run's usage and cost recorded, the answer lost, recorded again: the
    conversation's totals count the run once, and other runs add up."""
    broker = AnswerLosingBroker("map_set")
    store = Store(broker)
    conversation_id = await _conversation(store)
    used = Usage(input_tokens=100, output_tokens=20, reasoning_tokens=5)
    record = functools.partial(store.record_run, conversation_id, "run-1", used, 0.25)
    assert await durably(record) == 0.25
    assert await store.record_run(conversation_id, "run-2", used, 0.5) == 0.75
    assert broker.lost == ["map_set"]
    assert await store.totals(conversation_id) == (used + used, 0.75)


async def test_a_run_ending_retried_through_lost_answers_counts_its_totals_once() -> None:
    """end_run with the runner's retrying storage calls, each write's first answer lost:
    the run's usage and cost count once in the conversation's totals."""
    broker = AnswerLosingBroker()
    store = Store(broker)
    await broker.start(lambda *_: None, lambda _: None)
    conversation_id = await _conversation(store)
    lease = await lifecycle.open_run(broker, store, conversation_id, "hi", 10_000, _no_reap)
    broker.to_lose = {"add_to_record", "map_set", "list_append"}
    used = Usage(input_tokens=100, output_tokens=20)
    answer = SnapshotMessage(id="a1", role="assistant", content="hello")
    end = RunEnd("success", usage=used, cost_usd=0.25, model="m", messages=[answer])
    ended = await lifecycle.end_run(broker, store, lease, end, durably=durably)
    assert ended.ending.metadata.total_cost_usd == 0.25  # type: ignore[union-attr]
    assert await store.totals(conversation_id) == (used, 0.25)
    assert [m.id for m in await store.messages(conversation_id)][1:] == ["a1"]


async def _no_reap(conversation_id: str) -> None:
    raise AssertionError("nothing to reap")


async def test_a_file_write_retried_after_its_answer_was_lost_is_stored_once() -> None:
    """write_file whose put was applied and its answer lost: retried, the tool reports
    the write and the workspace holds the one file with its content."""
    broker = AnswerLosingBroker("map_set")
    store = Store(broker)
    conversation_id = await _conversation(store)
    workspace = Workspace(store, conversation_id, max_file_bytes=1000, max_files=1)
    call: Callable[[], Any] = functools.partial(
        workspace.call, "write_file", '{"path": "a.txt", "content": "hello"}'
    )
    outcome = await durably(call)
    assert broker.lost == ["map_set"]
    assert (outcome.content, outcome.is_error) == ("Wrote a.txt (5 bytes).", False)
    assert await store.list_files(conversation_id) == {"a.txt": 5}
    assert await store.read_file(conversation_id, "a.txt") == "hello"


async def test_the_runner_s_history_write_whose_redis_answer_was_lost_counts_once(
    llm_server: LLMServer, start_server: StartServer, redis_server: RedisServer
) -> None:
    """Real Redis behind a relay that drops the answer to the run's history write (after
    Redis stored it): the runner retries, and the next LLM call is sent the answer once."""
    # Streamed in two deltas: only the history write carries the whole answer.
    llm_server.enqueue(
        stream(content("Zebra-"), content("quartz-42"), finish("stop"), usage(10, 5)),
        text("Second."),
    )
    async with LosingRelay(redis_server.port, b"Zebra-quartz-42", drop=True) as relay:
        parts = urlsplit(redis_server.url)
        netloc = f"{parts.netloc.rpartition('@')[0]}@127.0.0.1:{relay.port}".lstrip("@")
        server = start_server(
            redis_url=urlunsplit(parts._replace(netloc=netloc)), env=llm_env(llm_server)
        )
        conversation = await create_conversation(server.url)
        session = await open_session(
            server.ws_url(conversation["id"]), conversation["id"], conversation["writeToken"]
        )
        for message in ("first", "second"):
            await session.send({"type": "message", "content": message})
            await session.until_run_ends()
        assert relay.spoiled.is_set()
        await session.close()
    sent = llm_server.requests[1].body["messages"]
    assert [m["content"] for m in sent if m["role"] == "assistant"] == ["Zebra-quartz-42"]
