"""Mail authentication end to end: a real daemon, a real dnsmasq holding the senders' and
our own records, real SMTP sessions, and Perl's Mail::DKIM as the independent verifier of
what hubport signs and seals (docs/exchange.md, "Mail authentication").

One daemon serves the whole module (its start is the slow part): each test sends its own
messages, told apart by subject.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dkim
import pytest

from daemon_process import Daemon, daemon_pool, hubport
from mail_auth_support import SenderKey, dns_with, mail, perl_verify, txt
from scenario_support import call
from send_peers import ScriptedSink, free_port
from smtp_support import receive_connector
from support import wait_for_sync, write_org

pytestmark = pytest.mark.timeout(300)

ORIGIN = SenderKey.make("origin.test")
FORWARDER = SenderKey.make("fwd.test")
UNTRUSTED = SenderKey.make("untrusted.test")
RECORDS = [
    txt("pass.test", "v=spf1 ip4:127.0.0.1 -all"),
    txt("fail.test", "v=spf1 ip4:192.0.2.1 -all"),
    txt("softfail.test", "v=spf1 ip4:192.0.2.1 ~all"),
    txt("neutral.test", "v=spf1 ?all"),
    txt("permerror.test", "v=spf1 ip4:300.1.1.1 -all"),
    txt("_dmarc.reject.test", "v=DMARC1; p=reject"),
    txt("_dmarc.quarantine.test", "v=DMARC1; p=quarantine"),
    txt("_dmarc.monitor.test", "v=DMARC1; p=none"),
    txt("_dmarc.contoso.test", "v=DMARC1; p=none"),
    txt("origin.test", "v=spf1 ip4:192.0.2.9 -all"),
    txt("_dmarc.origin.test", "v=DMARC1; p=reject"),
    txt(ORIGIN.name, ORIGIN.record),
    txt("fwd.test", "v=spf1 ip4:127.0.0.1 -all"), txt(FORWARDER.name, FORWARDER.record),
    txt("untrusted.test", "v=spf1 ip4:127.0.0.1 -all"),
    txt(UNTRUSTED.name, UNTRUSTED.record),
]


@dataclass
class Hub:
    home: Path
    config: Path
    inbound: int  # anonymous, checked
    unchecked: int  # MailAuthentication = "None"
    dns: int
    sink: ScriptedSink
    daemon: Daemon

    def cmdlet(self, line: str) -> str:
        status, out, err = call(self.home, line, "--config", str(self.config))
        assert status == 0, f"{line}\n{out}\n{err}"
        return out

    def mailbox(self, name: str) -> list[bytes]:
        """The messages in a mailbox, with CRLF line endings (the Maildir keeps LF)."""
        folder = self.home / "var" / "mailboxes" / name / "new"
        return [p.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
                for p in sorted(folder.glob("*"))] if folder.is_dir() else []

    def delivered(self, name: str, subject: str, timeout: float = 60) -> bytes:
        found: list[bytes] = wait_for_sync(
            lambda: [m for m in self.mailbox(name) if f"Subject: {subject}\r\n".encode() in m],
            timeout, what=f"{subject!r} in {name}'s mailbox",
            describe=lambda: [m[:300] for m in self.mailbox(name)])
        return found[0]

    def sent(self, subject: str, timeout: float = 60) -> bytes:
        found = wait_for_sync(
            lambda: [r.data for r in self.sink.received
                     if f"Subject: {subject}\r\n".encode() in r.data], timeout,
            what=f"{subject!r} at the smart host",
            describe=lambda: [r.data[:200] for r in self.sink.received])
        return bytes(found[0])

    def reload_after(self, line: str) -> None:
        """A cmdlet, then wait until the daemon has reloaded the change."""
        before = self.daemon.log_text().count("configuration reloaded")
        self.cmdlet(line)
        wait_for_sync(lambda: self.daemon.log_text().count("configuration reloaded") > before,
                      30, what="the daemon's reload", describe=lambda: self.daemon.log_text()[-600:])


def smtp(port: int, sender: str, message: bytes, rcpt: str = "alice@contoso.test",
         helo: str = "client.test") -> tuple[int, str]:
    """One message over a real SMTP session: the reply to the end of DATA."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=60) as client:
        client.ehlo(helo)
        code, text = client.mail(sender)
        assert code == 250, text
        code, text = client.rcpt(rcpt)
        assert code == 250, text
        try:
            code, reply = client.data(message)
        except smtplib.SMTPDataError as exc:
            code, reply = exc.smtp_code, exc.smtp_error
        print(f"{sender} -> {rcpt}: {code} {reply.decode()}")  # shown by pytest -rP
        return code, reply.decode()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    home = tmp_path_factory.mktemp("hub")
    inbound, unchecked = free_port(), free_port()
    extra = receive_connector("From Internet", [f"127.0.0.1:{inbound}"],
                              PermissionGroups=["AnonymousUsers"])
    extra += receive_connector("From Partner", [f"127.0.0.1:{unchecked}"],
                               PermissionGroups=["AnonymousUsers"], MailAuthentication="None")
    extra += ('[[mailbox]]\nName = "Quarantine"\nPrimarySmtpAddress = "quarantine@contoso.test"'
              '\n\n[[mail_contact]]\nName = "Kim"\nAlias = "kim"\n'
              'ExternalEmailAddress = "SMTP:kim@partner.example"\n\n')
    with ScriptedSink() as sink:
        extra += (f'[[send_connector]]\nName = "To Internet"\nAddressSpaces = ["SMTP:*;1"]\n'
                  f'SmartHosts = ["[127.0.0.1]"]\nPort = {sink.port}\n'
                  'SmartHostAuthMechanism = "None"\nDNSRoutingEnabled = false\n\n')
        config = write_org(home, extra=extra)
        hub = Hub(home, config, inbound, unchecked, 0, sink, None)  # type: ignore[arg-type]
        hub.cmdlet("New-DkimSigningConfig -DomainName contoso.test -Enabled $true"
                   " -Ed25519Enabled $true")
        keys = json.loads(hub.cmdlet("Get-DkimSigningConfig contoso.test | ConvertTo-Json"))[0]
        ours = [txt(keys[f"{label}RecordName"], keys[f"{label}Record"])
                for label in ("Selector1", "Selector2", "Selector1Ed25519", "Selector2Ed25519")]
        with dns_with(RECORDS + ours, failing=("tempfail.test",)) as dns:
            hub.dns = dns
            hub.cmdlet(f"Set-TransportServer HUB01 -ExternalDnsServers 127.0.0.1:{dns}")
            # the first Set-SenderIdConfig turns the checks on (no -Enabled needed)
            hub.cmdlet("Set-SenderIdConfig -SpoofedDomainAction Reject"
                       " -TempErrorAction Reject -ArcTrustedSealers fwd.test")
            hub.cmdlet("Set-AntiPhishPolicy -Identity Default -HonorDmarcPolicy $true"
                       " -DmarcRejectAction Reject -DmarcQuarantineAction Quarantine"
                       " -QuarantineMailbox quarantine@contoso.test")
            with daemon_pool(home / "daemons") as pool:
                hub.daemon = pool.start(config=config, cwd=home)
                hub.daemon.wait_ready(60)
                yield hub


def results_of(message: bytes) -> str:
    """Our Authentication-Results field, unfolded."""
    head = message.split(b"\r\n\r\n", 1)[0].decode()
    fields = [f for f in head.replace("\r\n\t", " ").replace("\r\n ", " ").split("\r\n")
              if f.lower().startswith("authentication-results: hub01.contoso.test")]
    assert len(fields) == 1, head
    return fields[0]


# -- inbound -------------------------------------------------------------------------------

@pytest.mark.parametrize("domain, code, enhanced, stamped", [
    ("pass.test", 250, "2.6.0", "spf=pass"),
    ("fail.test", 550, "5.7.23", None),  # SpoofedDomainAction Reject
    ("softfail.test", 250, "2.6.0", "spf=softfail"),
    ("neutral.test", 250, "2.6.0", "spf=neutral"),
    ("none.test", 250, "2.6.0", "spf=none"),
    ("tempfail.test", 451, "4.7.24", None),  # TempErrorAction Reject: never a 5xx
    ("permerror.test", 250, "2.6.0", "spf=permerror"),
])
def test_each_spf_result_end_to_end(hub: Hub, domain: str, code: int, enhanced: str,
                                    stamped: str | None) -> None:
    subject = f"spf {domain}"
    got, reply = smtp(hub.inbound, f"x@{domain}", mail(f"x@{domain}", subject=subject))
    assert (got, reply.split(" ", 1)[0]) == (code, enhanced), reply
    if stamped is not None:
        results = results_of(hub.delivered("Alice", subject))
        print(results)
        assert stamped in results and f"smtp.mailfrom=x@{domain}" in results, results


def test_each_dmarc_policy_end_to_end(hub: Hub) -> None:
    code, reply = smtp(hub.inbound, "x@pass.test", mail("ceo@reject.test", subject="dmarc r"))
    assert (code, reply.split(" ", 1)[0]) == (550, "5.7.1") and "DMARC" in reply
    code, _reply = smtp(hub.inbound, "x@pass.test", mail("ceo@quarantine.test",
                                                          subject="dmarc q"))
    assert code == 250
    held = hub.delivered("Quarantine", "dmarc q")
    assert b"X-Hubport-Quarantined: fail dmarc (quarantine); for alice@contoso.test" in held
    assert "dmarc=fail" in results_of(held)
    code, _reply = smtp(hub.inbound, "x@pass.test", mail("ceo@monitor.test", subject="dmarc n"))
    assert code == 250
    results = results_of(hub.delivered("Alice", "dmarc n"))
    assert "dmarc=fail" in results and "policy.dmarc=none" in results
    assert not [m for m in hub.mailbox("Alice") if b"Subject: dmarc q" in m]
    # the tracking log has each result, and the refusal
    events = json.loads(hubport("Get-MessageTrackingLog -Sender x@pass.test | ConvertTo-Json",
                                "--config", str(hub.config), cwd=hub.home).stdout)
    contexts = {e["source-context"] for e in events}
    assert any("dmarc=fail(reject)" in c for c in contexts), contexts
    assert {"RECEIVE", "FAIL"} <= {e["event-id"] for e in events}, events


def test_a_spoof_of_our_own_domain_is_refused_or_stamped_as_configured(hub: Hub) -> None:
    spoof = mail("ceo@contoso.test", subject="spoof 1")
    code, reply = smtp(hub.inbound, "x@pass.test", spoof)
    assert (code, reply.split(" ", 1)[0]) == (550, "5.7.1") and "contoso.test" in reply
    hub.reload_after("Set-SenderIdConfig -SpoofedDomainAction StampStatus")
    code, _reply = smtp(hub.inbound, "x@pass.test", mail("ceo@contoso.test",
                                                          subject="spoof 2"))
    assert code == 250
    results = results_of(hub.delivered("Alice", "spoof 2"))
    assert "spf=pass" in results and "dkim=none" in results, results
    hub.reload_after("Set-SenderIdConfig -SpoofedDomainAction Delete")
    code, _reply = smtp(hub.inbound, "x@pass.test", mail("ceo@contoso.test",
                                                          subject="spoof 3"))
    assert code == 250  # accepted, and deleted: the sender is not told
    dropped = wait_for_sync(lambda: [e for e in json.loads(hubport(
        "Get-MessageTrackingLog -EventId DROP | ConvertTo-Json", "--config", str(hub.config),
        cwd=hub.home).stdout) if e["message-subject"] == "spoof 3"], 30,
        what="the DROP of spoof 3")
    assert "action=Delete" in dropped[0]["source-context"]
    assert not [m for m in hub.mailbox("Alice") if b"Subject: spoof 3" in m]
    hub.reload_after("Set-SenderIdConfig -SpoofedDomainAction Reject")


def test_a_forged_authentication_results_is_removed(hub: Hub) -> None:
    forged = mail("x@pass.test", subject="forged ar", extra=(
        "Authentication-Results: hub01.contoso.test; spf=pass smtp.mailfrom=ceo@contoso.test;"
        " dmarc=pass header.from=contoso.test\r\n"))
    assert smtp(hub.inbound, "x@pass.test", forged)[0] == 250
    delivered = hub.delivered("Alice", "forged ar")
    assert b"smtp.mailfrom=ceo@contoso.test" not in delivered
    assert "spf=pass" in results_of(delivered)  # ours, and only ours


def test_sessions_not_from_the_internet_are_not_checked(hub: Hub) -> None:
    code, _reply = smtp(hub.unchecked, "x@fail.test", mail("x@fail.test", subject="partner"))
    assert code == 250
    assert b"Authentication-Results" not in hub.delivered("Alice", "partner")


# -- outbound ------------------------------------------------------------------------------

def test_signed_mail_verifies_with_an_independent_implementation_through_a_rotation(
        hub: Hub) -> None:
    """Mail signed before, during and after Rotate-DkimSigningConfig all verifies with
    Perl's Mail::DKIM: both selectors' records were published when the keys were made."""
    pickup = hub.home / "pickup"

    def send(subject: str) -> None:
        content = mail("alice@contoso.test", "someone@example.test", subject).replace(
            b"\r\n", b"\n")
        (pickup / f"{subject}.eml").write_bytes(content)

    before = json.loads(hub.cmdlet("Get-DkimSigningConfig | ConvertTo-Json"))[0][
        "ActiveSelector"]
    after = "selector2" if before == "selector1" else "selector1"
    send("signed 1")
    first = hub.sent("signed 1")
    hub.reload_after("Rotate-DkimSigningConfig contoso.test")
    send("signed 2")
    second = hub.sent("signed 2")
    for message, selector in ((first, before), (second, after)):
        lines = perl_verify(message, hub.dns)
        print("Mail::DKIM:", lines)
        assert f"pass d=contoso.test s={selector} a=rsa-sha256" in lines, lines
        assert lines[-1] == "result=pass", lines
        # the ed25519 signature, which this Mail::DKIM does not know: checked with dkimpy
        ed25519 = [i for i, f in enumerate(_signatures(message)) if b"ed25519" in f]
        assert ed25519 and dkim.DKIM(message).verify(
            idx=ed25519[0], dnsfunc=lambda name, timeout=5: _txt(hub.dns, name))
    # 8-bit content is converted to 7 bits before it is signed, so no later conversion
    # (for a peer without 8BITMIME) can break the signature
    (pickup / "8bit.eml").write_bytes(mail(
        "alice@contoso.test", "someone@example.test", "signed 8bit", body="Grüße\r\n",
        extra="MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
              "Content-Transfer-Encoding: 8bit\r\n").replace(b"\r\n", b"\n"))
    converted = hub.sent("signed 8bit")
    assert converted.isascii() and perl_verify(converted, hub.dns)[-1] == "result=pass"
    head = second.split(b"\r\n\r\n", 1)[0]
    assert b"h=from : to : subject : date : message-id : from : to : subject : date" in \
        head.replace(b"\r\n ", b" ")
    # internal delivery is not signed
    (pickup / "internal.eml").write_bytes(mail("alice@contoso.test", "bob@contoso.test",
                                               "internal").replace(b"\r\n", b"\n"))
    assert b"DKIM-Signature" not in hub.delivered("Bob", "internal")


def test_an_unusable_key_stops_signing_but_not_mail(hub: Hub) -> None:
    active = json.loads(hub.cmdlet("Get-DkimSigningConfig | ConvertTo-Json"))[0][
        "ActiveSelector"]  # the tests may run in any order, on several hubs
    key = hub.home / "org-dkim" / "contoso.test" / f"{active}.key"
    saved = key.read_bytes()
    try:
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        (hub.home / "pickup" / "unsigned.eml").write_bytes(
            mail("alice@contoso.test", "someone@example.test", "unsigned").replace(
                b"\r\n", b"\n"))
        sent = hub.sent("unsigned")
        assert f"s={active};".encode() not in sent.replace(b"\r\n ", b" ")
        wait_for_sync(lambda: "DKIM signing key unusable" in hub.daemon.log_text(), 30,
                      what="the key's error line")
        status = json.loads(hub.cmdlet("Get-DkimSigningConfig | ConvertTo-Json"))[0]["Status"]
        assert status.startswith("KeyMissing") and active in status, status
    finally:
        key.write_bytes(saved)


def test_a_forwarded_message_with_a_valid_arc_chain(hub: Hub) -> None:
    """A list at fwd.test changed a message from origin.test (p=reject), breaking its DKIM
    signature, and ARC-sealed it with Perl's Mail::DKIM. hubport validates the chain, lets
    the trusted sealer overrule DMARC, and seals again when the message leaves for Kim; an
    untrusted sealer's message is refused."""
    for key in (FORWARDER, UNTRUSTED):
        (hub.home / f"{key.domain}.pem").write_bytes(key.pem)
    original = ORIGIN.sign(mail("ceo@origin.test", "kim@contoso.test", "forwarded"))
    for sealer, subject in ((FORWARDER, "[list] forwarded"), (UNTRUSTED, "[other] forwarded")):
        changed = original.replace(b"Subject: forwarded", f"Subject: {subject}".encode())
        changed = (f"Authentication-Results: {sealer.domain}; arc=none; dkim=pass"
                   f" header.d=origin.test; dmarc=pass header.from=origin.test\r\n").encode() \
            + changed + b"-- \r\nthe list's footer\r\n"
        seal = subprocess.run(
            ["perl", str(Path(__file__).with_name("arc_seal.pl")),
             str(hub.home / f"{sealer.domain}.pem"), sealer.domain, sealer.selector,
             sealer.domain], input=changed, capture_output=True, timeout=60, check=True)
        sealed = seal.stdout + changed
        code, reply = smtp(hub.inbound, f"list@{sealer.domain}", sealed, "kim@contoso.test")
        if sealer is UNTRUSTED:
            assert (code, reply.split(" ", 1)[0]) == (550, "5.7.1"), reply
            continue
        assert code == 250, reply
    out = hub.sent("[list] forwarded")
    results = results_of(out)
    assert "arc=pass" in results and "dmarc=fail" in results and "arc override" in results
    assert "dkim=fail" in results  # the list changed the body
    lines = perl_verify(out, hub.dns, "arc")
    print(results, "\nMail::DKIM::ARC:", lines)
    assert lines[-1] == "result=pass", lines
    assert b"ARC-Seal: i=2;" in out.replace(b"\r\n ", b" ")


def _signatures(message: bytes) -> list[bytes]:
    return [value for name, value in dkim.DKIM(message).headers
            if name.lower() == b"dkim-signature"]


def _txt(port: int, name: bytes) -> bytes | None:
    from hubport.plugins.mail_auth.dns_txt import Lookup

    found = Lookup([("127.0.0.1", port)]).txt(name.decode().rstrip("."))
    return found[0] if found else None


def test_the_cmdlets_answer_what_a_hub_lacks(hub: Hub, tmp_path: Path) -> None:
    """A hub on another machine without the keys: Get-DkimSigningConfig says so, and the
    daemon says so at start; export-secrets carries them over."""
    other = tmp_path / "other"
    other.mkdir()
    copy = other / "org.toml"
    copy.write_text(hub.config.read_text())
    status, out, _err = call(other, "Get-DkimSigningConfig | ConvertTo-Json", "--config",
                             str(copy))
    assert status == 0 and json.loads(out)[0]["Status"].startswith("KeyMissing"), out
    with daemon_pool(other / "daemons") as pool:  # its listeners may clash: the log is what counts
        started = pool.start(config=copy, cwd=other)
        started.wait_for_log("should DKIM-sign", 60)
    done = hubport("export-secrets", "HUB01", "--out", str(other / "secrets"), "--config",
                   str(hub.config), cwd=hub.home)
    assert done.returncode == 0, done.stderr
    manifest = (other / "secrets" / "MANIFEST").read_text()
    assert "selector1.key" in manifest and "selector2-ed25519.key" in manifest
