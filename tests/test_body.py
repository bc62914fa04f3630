"""Message bodies: in memory when small, in a spool file beside the queue when large."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hubport.core import queue as q
from hubport.core.body import MessageBody, SpoolWriter, spool_folder
from hubport.core.headers import rebuild, rewrite_header_section
from hubport.core.model import Envelope, EnvelopeRecipient, MailFrom, Submission
from hubport.core.store import Store

HEAD = b"Subject: big\r\nX-Drop: me\r\n\r\n"


async def _spooled(folder: Path, content: bytes, threshold: int = 16) -> MessageBody:
    writer = SpoolWriter(folder, threshold=threshold)
    for start in range(0, len(content), 7):
        await writer.write(content[start:start + 7])
    return await writer.finish()


def test_small_body_stays_in_memory(tmp_path: Path) -> None:
    body = asyncio.run(_spooled(tmp_path, b"short", threshold=16))
    assert not body.spooled and body.read() == b"short" and body.size == 5
    assert list(tmp_path.iterdir()) == []


def test_large_body_goes_to_one_durable_file_and_reads_back_in_chunks(tmp_path: Path) -> None:
    content = HEAD + b"line\r\n" * 100
    body = asyncio.run(_spooled(tmp_path, content))
    assert body.spooled and body.spool is not None and body.spool.parent == tmp_path
    assert body.spool.read_bytes() == content
    assert body.read() == content and body.size == len(content)
    assert b"".join(body.chunks(10)) == content
    assert max(len(c) for c in body.chunks(10)) == 10

    async def collect() -> bytes:
        return b"".join([c async for c in body.achunks(33)])

    assert asyncio.run(collect()) == content
    assert body.read_prefix(len(HEAD)) == HEAD


def test_rewriting_the_header_section_leaves_the_spool_file_alone(tmp_path: Path) -> None:
    content = HEAD + b"body\r\n" * 50
    body = asyncio.run(_spooled(tmp_path, content))
    rewritten = rewrite_header_section(body, lambda parsed: rebuild(
        parsed, remove=lambda f: f.lname == "x-drop", prepend=[b"Received: by us\r\n"]),
        limit=40)
    expected = b"Received: by us\r\nSubject: big\r\n\r\n" + b"body\r\n" * 50
    assert rewritten.read() == expected and rewritten.size == len(expected)
    assert rewritten.spool == body.spool and body.spool is not None
    assert body.spool.read_bytes() == content  # untouched
    twice = rewritten.replace_prefix(9, b"X: y\r\n")
    assert twice.read() == b"X: y\r\n" + expected[9:]


def test_discard_removes_the_file(tmp_path: Path) -> None:
    async def run() -> None:
        writer = SpoolWriter(tmp_path, threshold=4)
        await writer.write(b"0123456789")
        assert writer.path is not None and writer.path.exists()
        writer.discard()

    asyncio.run(run())
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_spool_file_is_an_error_not_a_short_message(tmp_path: Path) -> None:
    body = asyncio.run(_spooled(tmp_path, HEAD + b"x" * 100))
    assert body.spool is not None
    with open(body.spool, "r+b") as fh:
        fh.truncate(50)
    with pytest.raises(OSError, match=r"ends .* early"):
        body.read()


def test_the_queue_names_the_file_and_removes_it_with_its_last_message(tmp_path: Path) -> None:
    path = tmp_path / "queue" / "mail.que"
    path.parent.mkdir()
    folder = spool_folder(path)
    content = HEAD + b"body\r\n" * 100

    async def run() -> None:
        store = Store(path)
        await store.open(q.SCHEMA)
        try:
            await store.write(q.upgrade)
            body = await _spooled(folder, content)
            body = body.replace_prefix(0, b"Received: x\r\n")
            sub = Submission(Envelope(MailFrom("a@example.test"),
                                      [EnvelopeRecipient("b@example.test")]), body, "SMTP")
            msg_id = await store.write(lambda c: q.insert_submission(c, sub, 0.0, 1e12))
            loaded = (await store.read(lambda c: q.load_messages(c, [msg_id])))[0]
            assert loaded.body.spooled and loaded.body.read() == b"Received: x\r\n" + content
            assert loaded.size == len(content) + 13
            assert await store.read(q.spool_names) == {body.spool.name}  # type: ignore[union-attr]
            assert await store.read(q.spool_garbage) == ([], [])
            await store.write(lambda c: c.execute("DELETE FROM message WHERE id=?", (msg_id,)))
            remove, seen = await store.read(q.spool_garbage)
            assert remove == seen == [body.spool.name]  # type: ignore[union-attr]
        finally:
            await store.close()

    asyncio.run(run())
