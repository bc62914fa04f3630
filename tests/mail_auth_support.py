"""What the mail authentication tests share: the sending domains' keys and DNS records
(served by a real dnsmasq on loopback), signing as those senders would, and Perl's
Mail::DKIM as the independent verifier."""

from __future__ import annotations

import base64
import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from send_peers import ScriptedDns, dnsmasq

VERIFIER = Path(__file__).with_name("dkim_verify.pl")


@dataclass(frozen=True)
class SenderKey:
    """A sending domain's RSA key and its published record."""

    domain: str
    selector: str
    pem: bytes
    record: str

    @classmethod
    def make(cls, domain: str, selector: str = "s1") -> SenderKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return cls(domain, selector, pem, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}")

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def sign(self, message: bytes, **options: object) -> bytes:
        """``message`` with this domain's DKIM-Signature on top."""
        field = dkim.sign(message, self.selector.encode(), self.domain.encode(), self.pem,
                          include_headers=[b"from", b"to", b"subject", b"date"],
                          **options)
        return field + message


def txt(name: str, text: str) -> str:
    """A dnsmasq TXT record; a text longer than 255 octets split into strings."""
    chunks = [text[i:i + 255] for i in range(0, len(text), 255)] or [""]
    return f"--txt-record={name}," + ",".join(chunks)


@contextlib.contextmanager
def dns_with(records: list[str], failing: tuple[str, ...] = ()) -> Iterator[int]:
    """dnsmasq answering ``records``; every name under ``failing`` gets SERVFAIL (from an
    upstream that always fails, as a broken authoritative server would)."""
    broken = {(f"{zone}", kind): "SERVFAIL" for zone in failing
              for kind in ("TXT", "A", "AAAA", "MX")}
    with ScriptedDns(broken) as upstream:
        forward = [f"--server=/{zone}/127.0.0.1#{upstream.port}" for zone in failing]
        with dnsmasq(*records, *forward) as port:
            yield port


def perl_verify(message: bytes, port: int, kind: str = "dkim") -> list[str]:
    """Mail::DKIM's verdict lines (dkim_verify.pl)."""
    done = subprocess.run(["perl", str(VERIFIER), str(port), kind], input=message,
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().splitlines()


def mail(sender: str, to: str = "alice@contoso.test", subject: str = "hello",
         extra: str = "", body: str = "Hello there.\r\n") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{abs(hash((sender, to, subject, extra)))}@test>\r\n{extra}\r\n"
            f"{body}").encode()
