"""Maildir, Drop and ``FolderWriter`` files of a spooled (large) body are written chunk by
chunk and hold exactly the octets the in-memory path writes (core/body.py, issue 12).

The bodies here are a few hundred KB spooled with a tiny threshold, read in chunks of an
odd size so that chunk boundaries fall between the CR and the LF of many line endings.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import hubport.core.body as message_body
from hubport.agents.drop import DropDirectoryAgent
from hubport.agents.maildir import MaildirAgent, crlf_to_lf
from hubport.core.agent_runner import run_agent
from hubport.core.api import FolderWriter, ItemResult, MailItem
from hubport.core.body import MessageBody, SpoolWriter
from hubport.core.file_commit import FilePlan, commit_files
from hubport.core.queue_admin import _base64_of
from hubport.plugins.pytest_plugin import AgentHarness, mail_item

CHUNK = 4093  # odd, so boundaries fall inside CRLFs
HEAD = (b"From: alice@contoso.test\r\nTo: bob@contoso.test\r\nSubject: big\r\n"
        b"X-MS-Exchange-Organization-SCL: 5\r\nX-Kept: yes\r\n\r\n")
CONTENT = HEAD + b"".join(b"line %d " % i + b"x" * (i % 89) + b"\r\n" for i in range(6000))


def spooled(folder: Path, content: bytes = CONTENT) -> MessageBody:
    writer = SpoolWriter(folder, threshold=16)
    for start in range(0, len(content), 65536):
        writer.write_sync(content[start:start + 65536])
    body = writer.finish_sync()
    assert body.spooled and b"".join(body.chunks()) == content
    return body


def split_inside_crlf(body: MessageBody) -> MessageBody:
    """The same octets, but the in-memory prefix ends with a CR whose LF is in the file."""
    cut = CONTENT.index(b"\r\n", 100_000) + 1
    split = body.replace_prefix(cut, CONTENT[:cut])
    assert split.prefix.endswith(b"\r") and b"".join(split.chunks()) == CONTENT
    return split


@pytest.fixture
def streaming(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Small chunks; a spooled body must never be read whole. Yields the sizes read."""
    sizes: list[int] = []
    chunks, read = MessageBody.chunks, MessageBody.read

    def spy(self: MessageBody, size: int = message_body.CHUNK_SIZE) -> Iterator[bytes]:
        sizes.append(size)
        return chunks(self, size)

    def whole(self: MessageBody) -> bytes:
        assert not self.spooled, "a spooled body was read whole"
        return read(self)

    monkeypatch.setattr(message_body, "CHUNK_SIZE", CHUNK)
    monkeypatch.setattr(MessageBody, "chunks", spy)
    monkeypatch.setattr(MessageBody, "read", whole)
    yield sizes


def with_body(item: MailItem, body: MessageBody) -> MailItem:
    return dataclasses.replace(item, message=dataclasses.replace(item.message, body=body))


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("size", [1, 2, 3, 7, 4093])
def test_crlf_to_lf_in_pieces_equals_the_whole_conversion(size: int) -> None:
    data = b"a\r\nb\r\r\nc\r\r\r\n\rd\n\r\n\r\r" + CONTENT[:20000] + b"\r"
    pieces = [data[i:i + size] for i in range(0, len(data), size)]
    assert b"".join(crlf_to_lf(pieces)) == data.replace(b"\r\n", b"\n")
    assert b"".join(crlf_to_lf([])) == b""


async def run_maildir(base: Path, item: MailItem) -> dict[str, bytes]:
    harness = AgentHarness(MaildirAgent, base_dir=base)
    outcome = await run_agent(MaildirAgent, None, item.next_hop, [item], harness.context)
    assert isinstance(outcome, list)
    assert {r.kind for r in outcome[0].recipients.values()} == {"delivered"}
    return files(base / "var" / "mailboxes")


@pytest.mark.parametrize("split", [False, True])
async def test_maildir_file_of_a_spooled_body_equals_the_in_memory_one(
        tmp_path: Path, streaming: list[int], split: bool) -> None:
    item = mail_item(recipients=["bob@contoso.test", "alice@contoso.test"], data=CONTENT)
    expected = await run_maildir(tmp_path / "memory", item)
    body = spooled(tmp_path / "spool")
    body = split_inside_crlf(body) if split else body
    assert any(c.endswith(b"\r") for c in body.chunks(CHUNK))  # a CRLF is split
    streaming.clear()
    got = await run_maildir(tmp_path / "streamed", with_body(item, body))
    assert len(got) == 2 and got == expected
    assert next(iter(got.values())).endswith(b"x" * (5999 % 89) + b"\n")
    assert streaming and set(streaming) == {CHUNK}  # read in chunks, never whole


async def run_drop(base: Path, item: MailItem) -> dict[str, bytes]:
    harness = AgentHarness(MaildirAgent, base_dir=base)
    connector = harness.organization.connector("Fax Gateway")
    outcome = await run_agent(DropDirectoryAgent, connector, item.next_hop, [item],
                              harness.context)
    assert isinstance(outcome, list)
    assert {r.kind for r in outcome[0].recipients.values()} == {"delivered"}
    return files(base / "drop")


async def test_drop_file_of_a_spooled_body_equals_the_in_memory_one(
        tmp_path: Path, streaming: list[int]) -> None:
    item = mail_item(recipients=["IMCEAFAX-+2B15551234@contoso.test"], data=CONTENT)
    expected = await run_drop(tmp_path / "memory", item)
    body = spooled(tmp_path / "spool")
    streaming.clear()
    got = await run_drop(tmp_path / "streamed", with_body(item, body))
    assert len(got) == 1 and got == expected
    data = next(iter(got.values()))
    assert data.startswith(b"X-Sender: <alice@contoso.test>\r\n")
    assert b"X-MS-Exchange-Organization-SCL" not in data and b"X-Kept: yes\r\n" in data
    assert data.endswith(CONTENT[-200:])
    assert streaming and set(streaming) == {CHUNK}


async def test_folder_writer_streams_a_message_body(tmp_path: Path,
                                                    streaming: list[int]) -> None:
    item = mail_item(data=CONTENT)
    body = split_inside_crlf(spooled(tmp_path / "spool"))
    writer = FolderWriter(AgentHarness(MaildirAgent, base_dir=tmp_path).context,
                          tmp_path / "out")
    (tmp_path / "out").mkdir()
    result = ItemResult()
    writer.add(result, item.recipients, "a.eml", [b"envelope\n", body])
    writer.add(result, [dataclasses.replace(item.recipients[0], id=9)], "b.eml", body)
    await writer.commit()
    assert {r.kind for r in result.recipients.values()} == {"delivered"}
    assert files(tmp_path / "out") == {"a.eml": b"envelope\n" + CONTENT, "b.eml": CONTENT}


async def test_an_unreadable_spool_file_defers_without_blaming_the_folder(
        tmp_path: Path) -> None:
    body = spooled(tmp_path / "spool")
    assert body.spool is not None
    body.spool.unlink()  # never happens while a row names it; the failure must stay contained
    recorded: list[dict[int, str]] = []

    async def record_intent(intents: dict[int, str]) -> None:
        recorded.append(intents)

    context: Any = dataclasses.replace(AgentHarness(MaildirAgent, base_dir=tmp_path).context,
                                       record_intent=record_intent)
    bad = FilePlan(0, [1], "a.eml", tmp_path / ".a.eml.tmp", tmp_path / "a.eml",
                   (b"head\n", body))
    good = FilePlan(0, [2], "b.eml", tmp_path / ".b.eml.tmp", tmp_path / "b.eml",
                    (b"head\n", MessageBody.of(b"small")))
    await commit_files([bad, good], context, "Folder X")
    assert bad.error is not None and bad.error.code == 451
    assert "message body unreadable" in bad.error.text and "Folder X" in bad.error.text
    assert good.error is None and recorded == [{2: "b.eml"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.eml", "spool"]  # no temp left
    assert (tmp_path / "b.eml").read_bytes() == b"head\nsmall"


@pytest.mark.parametrize("head", [b"", b"X", b"XY", b"XYZ", b"X-Sender: <a@b>\r\n"])
def test_export_base64_in_pieces_equals_the_whole_encoding(tmp_path: Path, head: bytes) -> None:
    body = split_inside_crlf(spooled(tmp_path / "spool"))
    for size in (1000, 4093, 1 << 20):
        assert _base64_of(head, body, size) == base64.b64encode(head + CONTENT).decode()
    assert _base64_of(head, MessageBody.of(b"ab")) == base64.b64encode(head + b"ab").decode()
