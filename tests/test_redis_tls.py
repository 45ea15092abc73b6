"""Redis over TLS (``rediss://``) on a real TLS-only redis-server with a throwaway CA.

The CA and the server certificate (SAN ``IP:127.0.0.1``) are made with the ``openssl``
command in the test's directory; the server asks for a password too.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from costream.broker.redis import RedisBroker
from costream.errors import StorageUnavailable
from tests.support.redis import RedisServer, RedisTls
from tests.support.ws import assert_well_formed, create_conversation, open_session
from tests.test_broker import (
    WAIT_S,
    Listener,
    delta,
    new_conversation,
    run_finished,
    seqs,
    start,
)

PASSWORD = "tls-S3cret-Pass-word"


def _openssl(*args: str | Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError("the openssl command is not installed")
    subprocess.run([binary, *map(str, args)], check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: its certificate and key."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _make_tls_files(directory: Path) -> RedisTls:
    """A CA and a server certificate for 127.0.0.1 signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _make_ca(directory, "test-ca")
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1",
    )  # fmt: skip
    extensions = directory / "server.ext"
    extensions.write_text(
        "subjectAltName=IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "1", "-extfile", extensions,
    )  # fmt: skip
    return RedisTls(cert_file=cert, key_file=key, ca_file=ca_cert)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A TLS-only redis-server with a password, stopped after the test."""
    server = RedisServer(
        tmp_path / "redis", password=PASSWORD, tls=_make_tls_files(tmp_path / "pki")
    )
    server.start()
    yield server
    server.stop()


def test_tls_redis_url_is_rediss_with_the_ca(tls_redis: RedisServer) -> None:
    """The TLS server's URL is rediss:// to its TLS port, checking the server against the CA."""
    assert tls_redis.tls is not None
    ca = quote(str(tls_redis.tls.ca_file), safe="/")
    assert tls_redis.url == (
        f"rediss://:{PASSWORD}@127.0.0.1:{tls_redis.port}/0"
        f"?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    )


async def test_brokers_share_a_conversation_and_its_live_tail_over_tls(
    tls_redis: RedisServer,
) -> None:
    """Over rediss:// with a password, one broker's appends reach another's subscription."""
    producer, viewer = RedisBroker(tls_redis.url), RedisBroker(tls_redis.url)
    listener = Listener()
    try:
        await producer.start(Listener().on_frame, Listener().on_resync)
        await viewer.start(listener.on_frame, listener.on_resync)
        assert await producer.ping() is True
        conversation_id = await new_conversation(producer)
        await viewer.subscribe(conversation_id)
        lease = await start(producer, conversation_id)
        await producer.append(lease, [delta(n) for n in range(1, 6)])
        last = await producer.finish_run(lease, [run_finished(conversation_id)], None)
        await listener.until(lambda: len(listener.logged(conversation_id)) >= last)
        log = await viewer.read_log(conversation_id, 0, 100)
        assert seqs(log) == list(range(1, last + 1))
        assert listener.logged(conversation_id) == log
        assert (await viewer.get_record(conversation_id) or {}).get("title") == b"test"
    finally:
        await producer.close()
        await viewer.close()


@pytest.mark.parametrize("mistake", ["other CA", "plain redis://"])
async def test_tls_redis_refused_fails_fast_without_leaking_the_password(
    tls_redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, mistake: str
) -> None:
    """A CA that did not sign the server, or no TLS: StorageUnavailable, ping False, no password."""
    caplog.set_level(logging.DEBUG)
    if mistake == "other CA":
        other_ca, _ = _make_ca(tmp_path, "other-ca")
        ca = quote(str(other_ca), safe="/")
        url = f"rediss://:{PASSWORD}@127.0.0.1:{tls_redis.port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    else:
        url = f"redis://:{PASSWORD}@127.0.0.1:{tls_redis.port}/0"
    broker = RedisBroker(url)
    listener = Listener()
    try:
        await broker.start(listener.on_frame, listener.on_resync)
        conversation_id = "c" * 16
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: broker.create_conversation(conversation_id, {"title": b"test"}),
            lambda: broker.log_state(conversation_id),
            lambda: broker.read_log(conversation_id, 0, 10),
            lambda: broker.get_record(conversation_id),
        ]
        async with asyncio.timeout(WAIT_S):  # never hangs
            for call in calls:
                with pytest.raises(StorageUnavailable) as raised:
                    await call()
                assert PASSWORD not in str(raised.value)
                assert raised.value.__cause__ is None
            assert await broker.ping() is False
            while "redis pub/sub connection" not in caplog.text:  # the reader tried too
                await asyncio.sleep(0.05)
        assert PASSWORD not in caplog.text
        assert all(PASSWORD not in record.getMessage() for record in caplog.records)
    finally:
        await broker.close()
    # Nothing got in: the server's keyspace is untouched.
    with tls_redis.client() as client:
        assert client.dbsize() == 0


async def test_run_reaches_a_viewer_through_a_server_on_tls_redis(
    start_server,  # type: ignore[no-untyped-def]
    tls_redis: RedisServer,
) -> None:
    """costream serve on rediss://: a writer's run reaches a viewer whole; no password logged."""
    server = start_server(redis_url=tls_redis.url)
    conv = await create_conversation(server.url)
    viewer = await open_session(server.ws_url(conv["id"]), conv["id"], conv["viewToken"])
    writer = await open_session(server.ws_url(conv["id"]), conv["id"], conv["writeToken"])
    await writer.send({"type": "message", "content": "Tell me a short story."})
    end = await viewer.until_run_ends()
    await writer.until_run_ends()
    assert end["type"] == "RUN_FINISHED", end
    assert_well_formed(viewer.events())
    assert viewer.logged() == writer.logged()
    await viewer.close()
    await writer.close()
    # The run went through Redis: its log is there.
    with tls_redis.client() as client:
        assert client.xlen(f"costream:{{{conv['id']}}}:log") == len(viewer.events())
    server.stop()
    assert PASSWORD not in server.log_text()
