"""The daemon's local control socket: how management commands reach a running daemon.

A Unix socket ``<StateDirectory>/control.sock``, owner-only: the state folder is made 0700
(it holds every queued message anyway) and the socket 0600, bound inside that folder so no
one else can connect even for a moment. A stale socket left by a killed daemon is replaced
(the daemon holds the state folder's lock, so no live daemon owns it); anything else at that
name is refused, never followed.

Protocol: JSON lines. A request ``{"op": "get-queue", "args": {...}}``; a response
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``. Several requests may
share a connection; each is answered in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("hubport.control")

SOCKET_NAME = "control.sock"
REQUEST_LIMIT = 1 << 20  # bytes of one request line
CLIENT_IDLE = 300.0  # seconds a control client may stay silent (or not read) before it is cut
MAX_UNIX_PATH = 100  # sun_path is 108 bytes; longer paths go through /proc/self/fd

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlError(Exception):
    """The daemon refused a request, or it cannot be reached (``no_daemon`` then)."""

    def __init__(self, message: str, *, no_daemon: bool = False) -> None:
        super().__init__(message)
        self.no_daemon = no_daemon


class RequestError(Exception):
    """Raised by a handler for a refusal the caller should read (not logged as a fault)."""


def socket_path(state: Path) -> Path:
    return state / SOCKET_NAME


def shown(path: Path) -> str:
    """A path as the user gave it: relative to the working folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@contextmanager
def _short_path(folder: Path, name: str) -> Iterator[str]:
    """A path to ``folder/name`` short enough for ``sun_path`` (via a directory fd)."""
    full = str(folder / name)
    if len(full.encode()) <= MAX_UNIX_PATH:
        yield full
        return
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dfd}/{name}"
    finally:
        os.close(dfd)


# -- the daemon's side ---------------------------------------------------------------------


class RequestServer:
    """Answers the protocol's requests with ``handler`` on any stream: the control socket
    here, the management endpoint (``core/management.py``) on TCP."""

    def __init__(self, handler: Handler,
                 refusals: tuple[type[BaseException], ...] = (RequestError,)) -> None:
        self.handler = handler
        self.refusals = refusals

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(CLIENT_IDLE):
                        line = await reader.readline()
                except TimeoutError:  # a client that says nothing frees its task
                    return
                except ValueError:  # longer than REQUEST_LIMIT
                    await self._reply(writer, {"ok": False, "error": "request too long"})
                    return
                if not line:
                    return
                await self._reply(writer, await self._answer(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError as exc:
            return {"ok": False, "error": f"bad request: {exc}"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "bad request: a request is a JSON object"}
        try:
            return {"ok": True, "result": await self.handler(request)}
        except self.refusals as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control request failed", op=request.get("op"))
            return {"ok": False, "error": f"internal error: {exc}"}

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
        writer.write(json.dumps(response, default=str).encode() + b"\n")
        try:
            async with asyncio.timeout(CLIENT_IDLE):  # a client that never reads
                await writer.drain()
        except TimeoutError:
            writer.transport.abort()
            raise ConnectionError("control client stopped reading") from None


class ControlServer(RequestServer):
    """Serves requests on the control socket with ``handler`` until stopped."""

    def __init__(self, state: Path, handler: Handler,
                 refusals: tuple[type[BaseException], ...] = (RequestError,)) -> None:
        super().__init__(handler, refusals)
        self.state = state
        self.path = socket_path(state)
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None

    async def start(self) -> None:
        sock = self._bind()
        try:
            self._server = await asyncio.start_unix_server(self._serve, sock=sock,
                                                           limit=REQUEST_LIMIT)
        except BaseException:
            sock.close()
            raise
        log.info("control socket listening", path=str(self.path))

    def _bind(self) -> socket.socket:
        st = os.stat(self.state)
        if st.st_uid != os.getuid():
            raise PermissionError(f"state folder {self.state} belongs to another user")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(self.state, 0o700)  # it holds the queue: owner-only
        try:
            existing = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(existing.st_mode):
                raise FileExistsError(f"{self.path} exists and is not a socket")
            os.unlink(self.path)  # left by a daemon that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _short_path(self.state, SOCKET_NAME) as address:
                sock.bind(address)
                os.chmod(address, 0o600)
            self._inode = os.lstat(self.path).st_ino
        except BaseException:
            sock.close()
            raise
        return sock

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        try:
            await asyncio.wait_for(self._server.wait_closed(), 5)
        except TimeoutError:
            pass
        self._server = None
        try:  # only our own socket: never one a later daemon made
            if os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


async def start_control(state: Path, handler: Handler,
                        refusals: tuple[type[BaseException], ...] = (RequestError,)
                        ) -> ControlServer | None:
    """Start the control server; None (logged) when the socket cannot be made safely —
    the daemon still moves mail, only the management commands cannot reach it."""
    server = ControlServer(state, handler, refusals)
    try:
        await server.start()
    except OSError as exc:
        log.error("control socket not available; queue commands cannot reach this daemon",
                  path=str(server.path), error=str(exc))
        return None
    return server


# -- the client's side -----------------------------------------------------------------------


def call(state: Path, op: str, args: dict[str, Any] | None = None,
         timeout: float = 120.0) -> Any:
    """Send one request to the daemon of ``state``; its result, or ControlError."""
    path = socket_path(state)
    missing = (f"no hubport daemon is running for state folder {shown(state)}"
               f" (no control socket at {shown(path)})")
    denied = (f"cannot use the control socket {shown(path)}: permission denied"
              " (run the command as the daemon's user)")
    try:
        os.lstat(path)
    except FileNotFoundError:
        raise ControlError(missing, no_daemon=True) from None
    except PermissionError:
        # the state folder is owner-only: another user cannot even see whether a socket is
        # there, and "no daemon" would send them looking for the wrong fault
        raise ControlError(f"{denied}; the state folder {shown(state)} belongs to another"
                           " user") from None
    except OSError as exc:
        raise ControlError(f"control socket {shown(path)}: {exc.strerror or exc}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            with _short_path(state, SOCKET_NAME) as address:
                sock.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            raise ControlError(f"no hubport daemon is running for state folder {shown(state)}"
                               f" (control socket {shown(path)} is stale)",
                               no_daemon=True) from None
        except PermissionError:
            raise ControlError(denied) from None
        sock.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
        data = _read_line(sock)
    except TimeoutError:
        raise ControlError(f"the daemon did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise ControlError(f"control socket {shown(path)}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        response = json.loads(data)
    except ValueError:
        raise ControlError("the daemon sent an unreadable answer") from None
    if not response.get("ok"):
        raise ControlError(str(response.get("error", "refused")))
    return response.get("result")


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        newline = chunk.find(b"\n")
        if newline >= 0:
            chunks.append(chunk[:newline])
            break
        chunks.append(chunk)
    if not chunks:
        raise ControlError("the daemon closed the connection without an answer")
    return b"".join(chunks)
