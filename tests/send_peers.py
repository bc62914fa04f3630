"""Real SMTP and DNS peers on loopback for the Send connector tests.

* ``ScriptedSink``: an aiosmtpd Controller whose replies a test scripts (RCPT/DATA replies,
  a drop after the final dot, STARTTLS with a trustme CA, AUTH PLAIN/LOGIN);
* ``silent_server``: accepts connections and never says a word (timeouts);
* ``smtp_sink``: Postfix's smtp-sink as a foreign peer;
* ``dnsmasq``: a real DNS server answering from its command line;
* ``ScriptedDns``: a tiny authoritative server answering per name and type, as broken
  servers do (NXDOMAIN for one type, SERVFAIL, silence).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

SMTP_SINK = "/usr/sbin/smtp-sink"
DNSMASQ = "/usr/sbin/dnsmasq"


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass
class Received:
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    rcpt_options: list[list[str]]
    data: bytes
    tls: bool
    auth: Any


@dataclass
class Script:
    """What the sink answers; addresses are compared in lower case."""

    rcpt: dict[str, str] = field(default_factory=dict)  # address -> reply
    data_reply: str = "250 2.0.0 Queued"
    drop_after_data: bool = False
    ehlo_extensions_removed: set[str] = field(default_factory=set)


class _Handler:
    def __init__(self, script: Script, dsn: bool = False) -> None:
        self.script = script
        self.dsn = dsn
        self.received: list[Received] = []
        self.connections = 0

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if not getattr(session, "counted", False):
            session.counted = True  # type: ignore[attr-defined]
            self.connections += 1
        removed = {e.upper() for e in self.script.ehlo_extensions_removed}
        kept = [r for r in responses if r[4:].split(" ")[0].upper() not in removed]
        if self.dsn:
            kept.insert(len(kept) - 1, "250-DSN")
        return kept

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        reply = self.script.rcpt.get(address.lower())
        if reply is not None and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(rcpt_options)  # type: ignore[arg-type]
        return reply or "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.script.drop_after_data:
            server.transport.close()  # type: ignore[union-attr]
            return "250 never seen"
        data = envelope.original_content or b""
        rcpt_options = getattr(envelope, "rcpt_options", [])
        self.received.append(Received(
            envelope.mail_from or "", list(envelope.mail_options), list(envelope.rcpt_tos),
            [list(o) for o in rcpt_options], data,
            bool(server.transport and server.transport.get_extra_info("sslcontext")),
            session.auth_data))
        return self.script.data_reply


class _DsnSMTP(SMTP):
    """aiosmtpd taking the DSN parameters (RFC 3461) it would otherwise refuse with 555.

    They stay in the options the handler and the envelope record, upper-cased as aiosmtpd
    gives every option.
    """

    def _getparams(self, params: Any) -> Any:
        result = super()._getparams(params)
        if result is not None:
            for key in ("RET", "ENVID", "NOTIFY", "ORCPT"):
                result.pop(key, None)
        return result


class _DsnController(Controller):
    def factory(self) -> SMTP:
        return _DsnSMTP(self.handler, **self.SMTP_kwargs)


class ScriptedSink:
    """An aiosmtpd sink in its own thread; ``received`` lists what was accepted.

    ``dsn=True`` announces DSN and takes RET/ENVID and NOTIFY/ORCPT.
    """

    def __init__(self, *, host: str = "127.0.0.1", script: Script | None = None,
                 tls: ssl.SSLContext | None = None,
                 users: dict[str, str] | None = None, auth_require_tls: bool = False,
                 smtputf8: bool = False, dsn: bool = False, port: int | None = None) -> None:
        self.script = script or Script()
        self.handler = _Handler(self.script, dsn)
        self.host = host
        self.port = port or free_port(host)
        self.users = users
        kwargs: dict[str, Any] = {"enable_SMTPUTF8": smtputf8, "ident": "scripted sink"}
        if tls is not None:
            kwargs["tls_context"] = tls
        if users is not None:
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_require_tls"] = auth_require_tls
        controller = _DsnController if dsn else Controller
        self.controller = controller(self.handler, hostname=host, port=self.port, **kwargs)

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                      mechanism: str, auth_data: Any) -> AuthResult:
        if isinstance(auth_data, LoginPassword) and self.users is not None:
            user, password = auth_data.login.decode(), auth_data.password.decode()
            if self.users.get(user) == password:
                return AuthResult(success=True, auth_data=(mechanism, user))
        return AuthResult(success=False, handled=False)

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    def __enter__(self) -> ScriptedSink:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


@dataclass
class TestCA:
    ca: trustme.CA
    ca_file: Path

    def server_context(self, *names: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*names).configure_cert(ctx)
        return ctx


def make_ca(folder: Path) -> TestCA:
    ca = trustme.CA()
    path = folder / "test-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return TestCA(ca, path)


@contextlib.asynccontextmanager
async def silent_server(host: str = "127.0.0.1"):
    """Accepts connections and never answers: the client must time out."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(Exception):
            await reader.read()

    server = await asyncio.start_server(handle, host, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()


@contextlib.contextmanager
def smtp_sink(*options: str, host: str = "127.0.0.1") -> Iterator[tuple[int, Path]]:
    """Postfix's smtp-sink; yields (port, a scratch folder)."""
    port = free_port(host)
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="smtp-sink-"))
    args = [SMTP_SINK, "-c", "-u", "nobody", *options, f"{host}:{port}", "64"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(host, port)
        yield port, folder
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def dnsmasq(*records: str, host: str = "127.0.0.1") -> Iterator[int]:
    """dnsmasq answering only from ``records`` (e.g. ``--mx-host=...``); yields its port."""
    # dnsmasq binds the port for UDP and TCP: another test may take the TCP side between
    # the choice and the bind (dnsmasq then exits), so a few ports are tried
    for attempt in range(5):
        port = free_port(host, socket.SOCK_DGRAM)
        args = [DNSMASQ, "--no-daemon", f"--port={port}", f"--listen-address={host}",
                "--bind-interfaces", "--no-resolv", "--no-hosts", "--local=/test/",
                "--user=nobody" if _root() else "--log-facility=-", *records]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_dns(host, port, proc)
        except RuntimeError:
            proc.wait(10)
            if attempt == 4:
                raise
            continue
        break
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _root() -> bool:
    import os
    return os.geteuid() == 0


def _wait_dns(host: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    import dns.message
    import dns.query
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"dnsmasq exited: {err}")
        try:
            dns.query.udp(dns.message.make_query("probe.test", "A"), host, port=port,
                          timeout=0.5)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise


class ScriptedDns:
    """A tiny authoritative DNS server on a real UDP socket, speaking DNS wire format.

    It answers each (name, type) as scripted, including the ways broken servers answer:
    ``answers[("host.test", "A")]`` is a list of record texts (empty: NOERROR, no data),
    or ``"NXDOMAIN"``, ``"SERVFAIL"``, ``"REFUSED"``, or ``"DROP"`` (never answer). Names
    not scripted get NXDOMAIN. ``queries`` records what was asked.
    """

    def __init__(self, answers: dict[tuple[str, str], list[str] | str],
                 host: str = "127.0.0.1") -> None:
        self.answers = {(n.lower().rstrip("."), t.upper()): v for (n, t), v in answers.items()}
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="scripted-dns", daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self._answer(wire)
            if reply is not None:
                with contextlib.suppress(OSError):
                    self.sock.sendto(reply, peer)

    def _answer(self, wire: bytes) -> bytes | None:
        import dns.flags
        import dns.message
        import dns.rcode
        import dns.rdataclass
        import dns.rdatatype
        import dns.rrset
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        scripted = self.answers.get((name, rdtype), "NXDOMAIN")
        if scripted == "DROP":
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if isinstance(scripted, str):
            response.set_rcode(dns.rcode.from_text(scripted))
        elif scripted:
            response.answer.append(dns.rrset.from_text_list(
                question.name, 60, dns.rdataclass.IN, question.rdtype, scripted))
        return response.to_wire()

    def __enter__(self) -> ScriptedDns:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def hub_tls(org: Any, server_name: str) -> ssl.SSLContext:
    """A server context for a peer standing in for another hub of ``org``: a certificate for
    that server's FQDN from the organization's CA (made if there is none yet), as its
    internal transport certificate would be."""
    from hubport.core.internal_tls import CertificateAuthority, organization_ca_folder

    server = org.server(server_name)
    ca = CertificateAuthority(organization_ca_folder(org, server))
    ca.ensure(org.transport_config.organization_name)
    cert, key = ca.issue([server.fqdn])
    pem = ca.folder / f"peer-{server.fqdn}.pem"
    pem.write_bytes(cert + key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem)
    return context


class Scanner:
    """Stamps ``X-Scanned: clean`` on each message and sends it back to ``back_port``."""

    def __init__(self, back_port: int) -> None:
        self.back_port = back_port
        self.seen: list[tuple[str, list[str], bytes]] = []
        self.lock = threading.Lock()
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.content if isinstance(envelope.content, bytes) else b""
        with self.lock:
            self.seen.append((envelope.mail_from or "", list(envelope.rcpt_tos), data))
        await aiosmtplib.send(b"X-Scanned: clean\r\n" + data, sender=envelope.mail_from or "",
                              recipients=envelope.rcpt_tos, hostname="127.0.0.1",
                              port=self.back_port, timeout=30, validate_certs=False)
        return "250 2.0.0 scanned"

    def __enter__(self) -> Scanner:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()
