"""A small asyncio client for etcd's v3 API, over its JSON gateway (``/v3/...``).

Why not a gRPC client: aetcd (the maintained asyncio one) opens a plaintext channel to one
endpoint, while an organization store needs several endpoints with failover, TLS with a
client certificate and etcd's user/password authentication; the JSON gateway is part of
etcd's stable v3 API (etcd 3.4 and later serve it on the client port), needs nothing but
the standard library, and speaks plain HTTP/1.1 that a test can read.

What the organization store uses: ``range`` (one key or a prefix), ``txn`` (compares, then
puts and deletes, one atomic step), ``watch`` (a stream of changes from a revision). Keys
and values are bytes; the gateway carries them base64-encoded. Every failure is an
``EtcdError`` that names the endpoint and what was asked.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Compare", "Endpoint", "EtcdClient", "EtcdError", "KeyValue", "Op", "prefix_end"]

#: how long one request may take (connect, send, answer) before the next endpoint is tried
REQUEST_TIMEOUT = 5.0
#: how long a request waits out a leader election before it fails
RETRY_FOR = 15.0
#: what etcd answers while it elects a leader or catches up: worth asking again
_TRANSIENT = ("leader changed", "no leader", "request timed out", "too many requests",
              "not capable", "unhealthy cluster", "timed out")


class EtcdError(Exception):
    """An etcd request failed: ``str()`` says where and why."""

    def __init__(self, message: str, *, code: int | None = None,
                 compacted: bool = False) -> None:
        super().__init__(message)
        self.code = code
        #: a watch asked for a revision etcd no longer keeps (a full reload is needed)
        self.compacted = compacted


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int


@dataclass(frozen=True)
class Compare:
    """A condition of a transaction on a key's mod revision: equal to ``mod_revision`` (0:
    the key does not exist), or, with ``prefix``, every key under it older than
    ``older_than`` (nothing there changed since a read at ``older_than - 1``)."""

    key: bytes
    mod_revision: int = 0
    prefix: bool = False
    older_than: int = 0

    def as_json(self) -> dict[str, Any]:
        if self.prefix:
            return {"key": _b64(self.key), "range_end": _b64(prefix_end(self.key)),
                    "target": "MOD", "result": "LESS", "mod_revision": str(self.older_than)}
        return {"key": _b64(self.key), "target": "MOD", "result": "EQUAL",
                "mod_revision": str(self.mod_revision)}


@dataclass(frozen=True)
class Op:
    """One operation of a transaction: a put, or a delete of a key (or of a prefix)."""

    key: bytes
    value: bytes | None = None  # None: delete
    prefix: bool = False  # delete every key under ``key``

    def as_json(self) -> dict[str, Any]:
        if self.value is not None:
            return {"request_put": {"key": _b64(self.key), "value": _b64(self.value)}}
        request: dict[str, Any] = {"key": _b64(self.key)}
        if self.prefix:
            request["range_end"] = _b64(prefix_end(self.key))
        return {"request_delete_range": request}


@dataclass
class EtcdClient:
    """Requests to the first endpoint that answers, in order; TLS when ``tls`` is given,
    a token from ``user``/``password`` when set."""

    endpoints: Sequence[Endpoint]
    tls: ssl.SSLContext | None = None
    user: str | None = None
    password: str | None = None
    timeout: float = REQUEST_TIMEOUT
    _token: str | None = field(default=None, repr=False)
    _preferred: int = 0

    def describe(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return ",".join(f"{scheme}://{e}" for e in self.endpoints)

    # -- the requests --------------------------------------------------------------------

    async def range(self, key: bytes, *, prefix: bool = False, revision: int = 0
                    ) -> tuple[list[KeyValue], int]:
        """The keys (``key`` itself, or every key under it), and the store's revision."""
        request: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            request["range_end"] = _b64(prefix_end(key))
        if revision:
            request["revision"] = str(revision)
        answer = await self._call("/v3/kv/range", request)
        return [_kv(item) for item in answer.get("kvs", [])], _revision(answer)

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op]
                  ) -> tuple[bool, int]:
        """Apply ``success`` if every compare holds; (whether it did, the new revision)."""
        answer = await self._call("/v3/kv/txn", {
            "compare": [c.as_json() for c in compares],
            "success": [op.as_json() for op in success]})
        return bool(answer.get("succeeded", False)), _revision(answer)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Write one key; with ``lease``, it goes when the lease expires."""
        request: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            request["lease"] = str(lease)
        answer = await self._call("/v3/kv/put", request)
        return _revision(answer)

    async def grant(self, ttl: int) -> int:
        """A lease of ``ttl`` seconds; its id."""
        answer = await self._call("/v3/lease/grant", {"TTL": str(ttl)})
        return int(answer.get("ID", 0))

    async def watch(self, key: bytes, *, prefix: bool = True, start_revision: int = 0
                    ) -> AsyncIterator[tuple[int, list[KeyValue]]]:
        """(revision, the keys changed) for each change under ``key`` from
        ``start_revision``; deleted keys come with an empty value. Ends with EtcdError when
        the stream breaks; ``compacted`` is set when the revision is gone."""
        request: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            request["range_end"] = _b64(prefix_end(key))
        if start_revision:
            request["start_revision"] = str(start_revision)
        reader, writer, endpoint = await self._open("/v3/watch",
                                                    {"create_request": request})
        try:
            async for message in _json_stream(reader, endpoint):
                result = message.get("result") or {}
                if "error" in message:
                    raise EtcdError(f"etcd {endpoint}: watch: {message['error']}")
                if result.get("compact_revision") and result.get("canceled"):
                    raise EtcdError(f"etcd {endpoint}: revision {start_revision} is"
                                    " compacted", compacted=True)
                if result.get("canceled"):
                    raise EtcdError(f"etcd {endpoint}: watch canceled:"
                                    f" {result.get('cancel_reason', '')}")
                events = result.get("events") or []
                if events:
                    yield _revision(result), [_kv(e.get("kv", {})) for e in events]
        finally:
            writer.close()

    async def status(self) -> dict[str, Any]:
        return await self._call("/v3/maintenance/status", {})

    # -- transport -----------------------------------------------------------------------

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request; an election in progress (a member died) is waited out for up to
        ``RETRY_FOR`` seconds, asking the next endpoint each time."""
        delay = 0.1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETRY_FOR
        while True:
            try:
                return await self._call_once(path, body)
            except EtcdError as exc:
                if not _transient(str(exc)) or loop.time() + delay > deadline:
                    raise
                self._preferred = (self._preferred + 1) % len(self.endpoints)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _call_once(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        reader, writer, endpoint = await self._open(path, body)
        try:
            status, payload = await asyncio.wait_for(_read_response(reader), self.timeout)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            raise EtcdError(f"etcd {endpoint}: {path}: {exc or type(exc).__name__}") from None
        finally:
            writer.close()
        try:
            answer = json.loads(payload) if payload else {}
        except ValueError:
            raise EtcdError(f"etcd {endpoint}: {path}: not a JSON answer") from None
        if status != 200 or "error" in answer:
            message = answer.get("message") or answer.get("error") or payload[:200]
            raise EtcdError(f"etcd {endpoint}: {path}: {message}", code=status)
        return answer

    async def _open(self, path: str, body: dict[str, Any]
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Endpoint]:
        """A connection with the request sent, to the first endpoint that takes it."""
        errors: list[str] = []
        count = len(self.endpoints)
        for i in range(count):
            index = (self._preferred + i) % count
            endpoint = self.endpoints[index]
            try:
                if self.user is not None and self._token is None:
                    self._token = await self._authenticate(endpoint)
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    endpoint.host, endpoint.port, ssl=self.tls,
                    server_hostname=endpoint.host if self.tls is not None else None),
                    self.timeout)
            except EtcdError:
                raise
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                errors.append(f"{endpoint}: {exc or type(exc).__name__}")
                continue
            writer.write(_request(endpoint, path, body, self._token))
            self._preferred = index
            return reader, writer, endpoint
        raise EtcdError(f"etcd {self.describe()}: no endpoint answers ({'; '.join(errors)})")

    async def _authenticate(self, endpoint: Endpoint) -> str:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            endpoint.host, endpoint.port, ssl=self.tls,
            server_hostname=endpoint.host if self.tls is not None else None), self.timeout)
        try:
            writer.write(_request(endpoint, "/v3/auth/authenticate",
                                  {"name": self.user, "password": self.password}, None))
            status, payload = await asyncio.wait_for(_read_response(reader), self.timeout)
        finally:
            writer.close()
        answer = json.loads(payload) if payload else {}
        if status != 200 or "token" not in answer:
            raise EtcdError(f"etcd {endpoint}: user {self.user!r} cannot log in:"
                            f" {answer.get('message') or answer.get('error') or status}",
                            code=status)
        return str(answer["token"])


def _transient(message: str) -> bool:
    return any(word in message.lower() for word in _TRANSIENT)


def prefix_end(key: bytes) -> bytes:
    """The first key after every key that starts with ``key`` (etcd's range_end)."""
    end = bytearray(key)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _kv(item: dict[str, Any]) -> KeyValue:
    return KeyValue(base64.b64decode(item.get("key", "")),
                    base64.b64decode(item.get("value", "")),
                    int(item.get("mod_revision", 0)), int(item.get("create_revision", 0)))


def _revision(answer: dict[str, Any]) -> int:
    return int((answer.get("header") or {}).get("revision", 0))


def _request(endpoint: Endpoint, path: str, body: dict[str, Any], token: str | None) -> bytes:
    data = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {endpoint}", "Content-Type: application/json",
            f"Content-Length: {len(data)}", "Connection: close"]
    if token:
        head.append(f"Authorization: {token}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    line = await reader.readline()
    parts = line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer: {line[:80]!r}")
    headers: dict[str, str] = {}
    while True:
        raw = await reader.readline()
        if raw in (b"\r\n", b"\n", b""):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, str]:
    status, headers = await _read_head(reader)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b"".join([piece async for piece in _chunks(reader)])
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()
    return status, body.decode("utf-8", "replace")


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size_line = await reader.readline()
        if not size_line:
            raise asyncio.IncompleteReadError(b"", None)
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readline()
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)


async def _json_stream(reader: asyncio.StreamReader, endpoint: Endpoint
                       ) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a streamed answer (the watch), as they come."""
    try:
        status, headers = await _read_head(reader)
    except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
        raise EtcdError(f"etcd {endpoint}: watch: {exc}") from None
    if status != 200:
        raise EtcdError(f"etcd {endpoint}: watch: HTTP {status}", code=status)
    decoder = json.JSONDecoder()
    buffer = ""
    chunked = headers.get("transfer-encoding", "").lower() == "chunked"
    pieces = _chunks(reader) if chunked else _raw(reader)
    try:
        async for piece in pieces:
            buffer += piece.decode("utf-8", "replace")
            while True:
                buffer = buffer.lstrip()
                if not buffer:
                    break
                try:
                    message, end = decoder.raw_decode(buffer)
                except ValueError:
                    break  # an object cut between two pieces: wait for the rest
                buffer = buffer[end:]
                yield message
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise EtcdError(f"etcd {endpoint}: watch: the stream broke ({exc})") from None
    raise EtcdError(f"etcd {endpoint}: watch: the stream ended")


async def _raw(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        piece = await reader.read(65536)
        if not piece:
            return
        yield piece
