"""Test helpers for receive connectors: free ports, connector TOML and a byte-exact client.

The client speaks raw bytes over a real socket, so a test can send exactly the sequences
docs/reliability.md lists (bare LF, smuggling vectors, pipelined DATA) and read every reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

from hubport.core.model import SmtpResponse

TIMEOUT = 20.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def receive_connector(name: str, bindings: list[str], **fields: Any) -> str:
    """A `[[receive_connector]]` table; test defaults: no tarpit, no greeting delay."""
    values: dict[str, Any] = {"Name": name, "Bindings": bindings, "TarpitInterval": "0s"}
    values.update(fields)
    lines = ["[[receive_connector]]"]
    for key, value in values.items():
        lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


class Reply:
    """A whole (possibly multi-line) SMTP reply."""

    def __init__(self, code: int, lines: list[str]) -> None:
        self.code = code
        self.lines = lines

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str:
        return SmtpResponse.parse(f"{self.code} {self.lines[-1]}").enhanced

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.lines!r})"


class Client:
    """A raw SMTP client; ``send`` writes bytes as given, ``reply`` reads one reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1", *,
                      source: str | None = None, ssl_context: ssl.SSLContext | None = None
                      ) -> Client:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, local_addr=(source, 0) if source else None, ssl=ssl_context,
            server_hostname="" if ssl_context else None), TIMEOUT)
        return cls(reader, writer)

    async def send(self, data: bytes | str) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)
        await self.writer.drain()

    async def reply(self, timeout: float = TIMEOUT) -> Reply:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError(f"connection closed; replies so far: {lines}")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if len(text) < 4 or text[3] != "-":
                return Reply(int(text[:3]), lines)

    async def cmd(self, line: str | bytes) -> Reply:
        data = line.encode() if isinstance(line, str) else line
        await self.send(data + b"\r\n")
        return await self.reply()

    async def hello(self, name: str = "client.test") -> Reply:
        """Read the banner and say EHLO."""
        banner = await self.reply()
        assert banner.code == 220, banner
        return await self.cmd(f"EHLO {name}")

    async def transaction(self, sender: str, recipients: list[str], body: bytes) -> Reply:
        assert (await self.cmd(f"MAIL FROM:<{sender}>")).code == 250
        for rcpt in recipients:
            reply = await self.cmd(f"RCPT TO:<{rcpt}>")
            assert reply.code == 250, reply
        assert (await self.cmd("DATA")).code == 354
        await self.send(body + b"\r\n.\r\n")
        return await self.reply()

    async def starttls(self, context: ssl.SSLContext | None = None) -> None:
        reply = await self.cmd("STARTTLS")
        assert reply.code == 220, reply
        await self.writer.start_tls(context or insecure_context(), server_hostname="")

    async def closed(self, timeout: float = TIMEOUT) -> bool:
        """True when the server closes the connection (after any pending replies)."""
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(4096), timeout)
                if not data:
                    return True
        except (ConnectionError, ssl.SSLError):
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def insecure_context() -> ssl.SSLContext:
    """A client context that accepts the hub's self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@contextlib.asynccontextmanager
async def connected(port: int, **kwargs: Any) -> AsyncIterator[Client]:
    client = await Client.connect(port, **kwargs)
    try:
        yield client
    finally:
        await client.close()


async def queued_count(hub: Any) -> int:
    """Messages committed to the queue so far (any state)."""
    return await hub.store.read(lambda c: c.execute("SELECT COUNT(*) FROM message")
                                .fetchone()[0])


def body(subject: str = "test", sender: str = "someone@example.org",
         to: str = "alice@contoso.test", text: str = "Hello.") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n{text}").encode()


async def send_one(port: int, rcpt: str, subject: str,
                   sender: str = "someone@example.org") -> None:
    """One message to ``rcpt`` over a plain SMTP session; every reply must be a success."""
    client = await Client.connect(port)
    await client.hello("client.example")
    assert (await client.cmd(f"MAIL FROM:<{sender}>")).code == 250
    reply = await client.cmd(f"RCPT TO:<{rcpt}>")
    assert reply.code == 250, reply
    assert (await client.cmd("DATA")).code == 354
    await client.send(body(subject, sender, rcpt) + b"\r\n.\r\n")
    reply = await client.reply()
    assert reply.code == 250, reply
    await client.close()


HubFactory = Callable[..., Any]


# -- helpers of the session tests (test_receive_session.py, test_receive_limits.py) ----------


async def set_password(hub: Any, login: str, password: str) -> None:
    """Give a mailbox a password in the running hub's password file (as set-password does)."""
    from hubport.core.credentials import PasswordStore, mailbox_for_login

    mailbox = mailbox_for_login(hub.daemon.org, login)
    assert mailbox is not None, login
    path = hub.daemon.server.password_file_path
    await asyncio.to_thread(PasswordStore(path).set_password, mailbox, password)


async def queued_data(hub: Any) -> list[bytes]:
    """The stored content of every queued message, oldest first."""
    rows = await hub.store.read(
        lambda c: c.execute("SELECT data FROM message ORDER BY id").fetchall())
    return [bytes(row[0]) for row in rows]


def auth_plain(login: str, password: str) -> str:
    """The base64 AUTH PLAIN response (empty authorization identity)."""
    import base64

    return base64.b64encode(f"\0{login}\0{password}".encode()).decode("ascii")


def b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode("ascii")
