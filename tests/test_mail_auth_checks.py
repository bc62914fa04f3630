"""The inbound checks one by one, against a real dnsmasq (plugins/mail_auth/checks.py):
every SPF result, DKIM on good and hostile signatures and key records, each DMARC policy
with alignment, sp= and pct=, ARC, and the verdict's actions (plugins/mail_auth/verdict.py).
The daemon's end of it is tests/test_mail_auth.py."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import dkim
import pytest

from hubport.core.config import load_organization
from hubport.core.headers import parse_header_section
from hubport.core.hooks import Hooks
from hubport.core.mail_auth_config import AntiPhishPolicy, SenderIdConfig
from hubport.plugins.mail_auth import dmarc, openssl_rsa
from hubport.plugins.mail_auth.checks import MAX_SIGNATURES, Checks, check_message
from hubport.plugins.mail_auth.dns_txt import Lookup
from hubport.plugins.mail_auth.verdict import decide, forged_results
from mail_auth_support import SenderKey, dns_with, mail, txt
from support import write_org

pytestmark = pytest.mark.timeout(120)

ORIGIN = SenderKey.make("origin.test")
SIGNER = SenderKey.make("signer.test")
BADKEY = "v=DKIM1; k=rsa; p=bm90IGEga2V5IGF0IGFsbA=="  # base64 of "not a key at all"
LOOPS = [txt(f"l{i}.test", f"v=spf1 include:l{i + 1}.test -all") for i in range(12)]

RECORDS = [
    txt("pass.test", "v=spf1 ip4:127.0.0.1 -all"),
    txt("fail.test", "v=spf1 ip4:192.0.2.1 -all"),
    txt("softfail.test", "v=spf1 ip4:192.0.2.1 ~all"),
    txt("neutral.test", "v=spf1 ?all"),
    # none.test: no record at all
    txt("permerror.test", "v=spf1 include:l0.test -all"),  # 12 nested includes: > 10 lookups
    *LOOPS,
    txt("loop.test", "v=spf1 include:loop.test -all"),
    txt("syntax.test", "v=spf1 ip4:300.1.1.1 -all"),
    txt("helo.pass.test", "v=spf1 a -all"), "--host-record=helo.pass.test,127.0.0.1",
    txt("origin.test", "v=spf1 ip4:192.0.2.9 -all"),
    txt(ORIGIN.name, ORIGIN.record),
    txt(SIGNER.name, SIGNER.record),
    txt("signer.test", "v=spf1 ip4:127.0.0.1 -all"),
    txt("bad._domainkey.signer.test", BADKEY),
    txt("_dmarc.origin.test", "v=DMARC1; p=reject; unknowntag=whatever; rua=mailto:d@origin.test"),
    txt("_dmarc.reject.test", "v=DMARC1; p=reject"),
    txt("reject.test", "v=spf1 ip4:192.0.2.9 -all"),
    txt("_dmarc.quarantine.test", "v=DMARC1; p=quarantine; sp=reject"),
    txt("_dmarc.monitor.test", "v=DMARC1; p=none"),
    txt("_dmarc.sampled.test", "v=DMARC1; p=reject; pct=0"),
    txt("_dmarc.strict.test", "v=DMARC1; p=reject; aspf=s"),
    txt("mail.strict.test", "v=spf1 ip4:127.0.0.1 -all"),
    txt("_dmarc.contoso.test", "v=DMARC1; p=none"),
]


@pytest.fixture(scope="module")
def lookup() -> Iterator[Lookup]:
    openssl_rsa.install()
    with dns_with(RECORDS, failing=("tempfail.test", "s1._domainkey.tempfail.test")) as port:
        yield Lookup([("127.0.0.1", port)])


def checks(lookup: Lookup, message: bytes, sender: str, helo: str = "client.example",
           ip: str = "127.0.0.1") -> Checks:
    return check_message(message, parse_header_section(message), ip=ip, helo=helo,
                         sender=sender, lookup=lookup)


# -- SPF ------------------------------------------------------------------------------------

@pytest.mark.parametrize("domain, result", [
    ("pass.test", "pass"), ("fail.test", "fail"), ("softfail.test", "softfail"),
    ("neutral.test", "neutral"), ("none.test", "none"), ("tempfail.test", "temperror"),
    ("permerror.test", "permerror"), ("loop.test", "permerror"), ("syntax.test", "permerror")])
def test_each_spf_result(lookup: Lookup, domain: str, result: str) -> None:
    got = checks(lookup, mail(f"x@{domain}"), f"x@{domain}")
    assert (got.spf.result, got.spf.identity, got.spf.checked) == \
        (result, "mailfrom", f"x@{domain}"), got.spf


def test_the_helo_name_and_the_null_sender_are_checked(lookup: Lookup) -> None:
    got = checks(lookup, mail("x@pass.test"), "", helo="helo.pass.test")
    assert got.spf_helo is not None and got.spf_helo.result == "pass"
    assert (got.spf.result, got.spf.checked) == ("pass", "postmaster@helo.pass.test")
    assert checks(lookup, mail("x@pass.test"), "x@pass.test", helo="[127.0.0.1]").spf_helo \
        is None  # an address literal is no domain to check


# -- DKIM -----------------------------------------------------------------------------------

def test_a_good_signature_passes_and_a_changed_body_fails(lookup: Lookup) -> None:
    signed = SIGNER.sign(mail("x@signer.test"))
    (result,) = checks(lookup, signed, "x@signer.test").dkim
    assert (result.result, result.domain, result.selector) == ("pass", "signer.test", "s1")
    (changed,) = checks(lookup, signed.replace(b"Hello there", b"Hello where"),
                        "x@signer.test").dkim
    assert changed.result == "fail" and "body hash" in changed.reason


def test_hostile_signatures_give_the_rfc_results(lookup: Lookup) -> None:
    message = mail("x@signer.test")
    malformed = b"DKIM-Signature: v=1; a=rsa-sha256; d=signer.test; garbage\r\n" + message
    assert [d.result for d in checks(lookup, malformed, "x@signer.test").dkim] == ["neutral"]
    no_key = SenderKey("signer.test", "absent", SIGNER.pem, "").sign(message)
    assert [d.result for d in checks(lookup, no_key, "x@signer.test").dkim] == ["permerror"]
    bad_key = SenderKey("signer.test", "bad", SIGNER.pem, "").sign(message)
    assert [d.result for d in checks(lookup, bad_key, "x@signer.test").dkim] == ["permerror"]
    huge_l = SIGNER.sign(message, length=True).replace(b" l=", b" l=999999999", 1)
    (result,) = checks(lookup, huge_l, "x@signer.test").dkim
    assert result.result in ("fail", "neutral", "permerror"), result


def test_an_absurd_number_of_signatures_is_cut_short(lookup: Lookup) -> None:
    message = mail("x@signer.test")
    field = SIGNER.sign(message)[:-len(message)]
    flood = field * 500 + message
    started = time.monotonic()
    results = checks(lookup, flood, "x@signer.test").dkim
    assert len(results) == MAX_SIGNATURES + 1 and results[-1].result == "policy"
    assert all(r.result == "pass" for r in results[:-1])
    assert time.monotonic() - started < 60  # bounded work, whatever the count


def test_a_dkim_key_lookup_that_fails_is_temperror(lookup: Lookup) -> None:
    signed = SenderKey("tempfail.test", "s1", SIGNER.pem, "").sign(mail("x@tempfail.test"))
    assert [d.result for d in checks(lookup, signed, "x@pass.test").dkim] == ["temperror"]


# -- DMARC ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sender, header_from, result, policy, disposition", [
    ("x@pass.test", "ceo@reject.test", "fail", "reject", "reject"),
    ("x@pass.test", "ceo@quarantine.test", "fail", "quarantine", "quarantine"),
    ("x@pass.test", "ceo@sub.quarantine.test", "fail", "reject", "reject"),  # sp=
    ("x@pass.test", "ceo@monitor.test", "fail", "none", "none"),
    ("x@pass.test", "ceo@sampled.test", "fail", "reject", "quarantine"),  # pct=0
    ("x@pass.test", "ceo@nodmarc.test", "none", "none", "none"),
    ("x@mail.strict.test", "ceo@strict.test", "fail", "reject", "reject"),  # aspf=s
    ("x@tempfail.test", "ceo@reject.test", "temperror", "reject", "none"),
])
def test_each_dmarc_policy(lookup: Lookup, sender: str, header_from: str, result: str,
                           policy: str, disposition: str) -> None:
    got = checks(lookup, mail(header_from), sender).dmarc
    assert (got.result, got.policy, got.disposition) == (result, policy, disposition), got


def test_dmarc_passes_on_aligned_dkim_and_ignores_unknown_tags(lookup: Lookup) -> None:
    signed = ORIGIN.sign(mail("ceo@origin.test"))
    got = checks(lookup, signed, "bounce@pass.test")  # SPF passes, but not for origin.test
    assert got.dmarc.result == "pass" and got.dmarc.policy == "reject"
    unsigned = checks(lookup, mail("ceo@origin.test"), "bounce@pass.test")
    assert (unsigned.dmarc.result, unsigned.dmarc.disposition) == ("fail", "reject")


def test_pct_samples(lookup: Lookup) -> None:
    record = dmarc.parse_record("v=DMARC1; p=reject; pct=50")
    assert record is not None and record.percent == 50
    outcomes = {dmarc.evaluate(lookup, "reject.test", "fail", "x.test", [],
                               rng=random.Random(seed)).disposition for seed in range(40)}
    assert outcomes == {"reject"}  # reject.test has no pct=: every failure
    assert dmarc.parse_record("v=DMARC1; p=bogus") is None
    assert dmarc.parse_record("v=DMARC1; p=bogus; rua=mailto:a@b.test") == \
        dmarc.DmarcRecord("none")
    assert dmarc.parse_record("p=reject; v=DMARC1") is None  # v= must come first


def test_several_from_addresses_are_a_permerror(lookup: Lookup) -> None:
    message = mail("a@reject.test, b@pass.test")
    assert checks(lookup, message, "x@pass.test").dmarc.result == "permerror"


# -- the verdict ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def org(tmp_path_factory: pytest.TempPathFactory) -> object:
    folder = tmp_path_factory.mktemp("org")
    return load_organization(write_org(folder), Hooks().registry.connector_types)


def verdict(org: object, got: Checks, message: bytes, **changes: object) -> object:
    sender_id = replace(SenderIdConfig(enabled=True), **{
        k: v for k, v in changes.items() if k in SenderIdConfig.__dataclass_fields__})
    policy = replace(AntiPhishPolicy(), **{
        k: v for k, v in changes.items() if k in AntiPhishPolicy.__dataclass_fields__})
    configured = replace(org, sender_id_config=sender_id, anti_phish_policy=policy)  # type: ignore[type-var]
    return decide(got, configured, parse_header_section(message), ["alice@contoso.test"],
                  "hub01.contoso.test", ["hub01.contoso.test"])


def test_actions(lookup: Lookup, org: object) -> None:
    reject = mail("ceo@reject.test")
    got = checks(lookup, reject, "x@pass.test")
    assert verdict(org, got, reject).response.enhanced == "5.7.1"  # type: ignore[attr-defined]
    quarantined = verdict(org, got, reject, dmarc_reject_action="Quarantine",
                          quarantine_mailbox="bob@contoso.test")
    assert quarantined.redirect_to == ("bob@contoso.test",)  # type: ignore[attr-defined]
    ignored = verdict(org, got, reject, honor_dmarc_policy=False)
    assert ignored.response is None and not ignored.redirect_to  # type: ignore[attr-defined]
    spoof = mail("ceo@contoso.test")
    got = checks(lookup, spoof, "x@pass.test")
    assert verdict(org, got, spoof).response is None  # type: ignore[attr-defined]
    refused = verdict(org, got, spoof, spoofed_domain_action="Reject").response  # type: ignore[attr-defined]
    assert (refused.code, refused.enhanced) == (550, "5.7.1")
    assert verdict(org, got, spoof, spoofed_domain_action="Delete").discard  # type: ignore[attr-defined]
    bypassed = verdict(org, got, spoof, spoofed_domain_action="Reject",
                       bypassed_sender_domains=("contoso.test",))
    assert bypassed.response is None and "bypassed" in bypassed.summary  # type: ignore[attr-defined]
    failing = mail("x@fail.test")
    got = checks(lookup, failing, "x@fail.test")
    refused = verdict(org, got, failing, spoofed_domain_action="Reject").response  # type: ignore[attr-defined]
    assert (refused.code, refused.enhanced) == (550, "5.7.23")
    temporary = mail("x@tempfail.test")
    got = checks(lookup, temporary, "x@tempfail.test")
    deferred = verdict(org, got, temporary, temp_error_action="Reject").response  # type: ignore[attr-defined]
    assert (deferred.code, deferred.enhanced) == (451, "4.7.24")
    assert verdict(org, got, temporary).response is None  # type: ignore[attr-defined]


def test_the_stamp_and_forged_claims(lookup: Lookup, org: object) -> None:
    forged = mail("x@pass.test", extra="Authentication-Results: hub01.contoso.test;"
                                       " spf=pass smtp.mailfrom=x@pass.test\r\n"
                                       "Authentication-Results: mx.elsewhere.test; none\r\n")
    parsed = parse_header_section(forged)
    assert forged_results(parsed, ["hub01.contoso.test"]) == (5,)
    for hostile in (" ;", ";;", "(unclosed comment", "hub01.contoso.test (x"):
        odd = parse_header_section(mail("x@pass.test", extra=f"Authentication-Results:"
                                                             f"{hostile}\r\n"))
        forged_results(odd, ["hub01.contoso.test"])  # an answer, never an exception
    got = checks(lookup, forged, "x@pass.test")
    result = verdict(org, got, forged)
    (stamp,) = result.prepend  # type: ignore[attr-defined]
    text = stamp.decode()
    assert text.startswith("Authentication-Results: hub01.contoso.test;")
    for part in ("spf=pass", "smtp.mailfrom=x@pass.test", "dkim=none", "dmarc=none",
                 "arc=none"):
        assert part in text, text
    assert result.remove == (5,)  # type: ignore[attr-defined]
    assert "spf=pass" in result.summary  # type: ignore[attr-defined]


def test_keys_in_dns_that_are_not_keys_never_crash(lookup: Lookup) -> None:
    for record_name in ("bad", "absent"):
        signed = SenderKey("signer.test", record_name, SIGNER.pem, "").sign(
            mail("x@signer.test"))
        assert checks(lookup, signed, "x@signer.test").dkim[0].result == "permerror"
    assert dkim  # dkimpy is the library under these checks


def test_key_folder_is_beside_the_organization(tmp_path: Path) -> None:
    from hubport.core.dkim_keys import dkim_key_folder

    org = load_organization(write_org(tmp_path), Hooks().registry.connector_types)
    assert dkim_key_folder(org, org.servers[0]) == tmp_path / "org-dkim"


def test_a_message_too_large_to_hold_is_checked_without_its_signatures(lookup: Lookup) -> None:
    signed = SIGNER.sign(mail("x@signer.test"))
    got = check_message(None, parse_header_section(signed), ip="127.0.0.1",
                        helo="client.test", sender="x@signer.test", lookup=lookup)
    assert [d.result for d in got.dkim] == ["policy"] and got.spf.result == "pass"
    assert got.arc.result == "none" and got.dmarc.result == "none"


async def test_a_check_that_crashes_still_removes_forged_results(
        monkeypatch: pytest.MonkeyPatch, org: object) -> None:
    """Input no check foresaw must not let a forged Authentication-Results through."""
    from hubport.core.body import MessageBody
    from hubport.core.model import MailFrom, ReceiveSession
    from hubport.plugins import mail_auth
    from hubport.plugins.mail_auth import checks as checks_module

    def unforeseen(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(checks_module, "check_message", unforeseen)
    forged = mail("x@pass.test", extra="Authentication-Results: hub01.contoso.test;"
                                       " dmarc=pass header.from=contoso.test\r\n")
    session = ReceiveSession("S1", "From Internet", "HUB01", "127.0.0.1", 1, "127.0.0.1", 25,
                             helo="client.test", mail_from=MailFrom("x@pass.test"))
    configured = replace(org, sender_id_config=SenderIdConfig(enabled=True))  # type: ignore[type-var]
    result = await mail_auth.authenticate_sender(
        session, parse_header_section(forged), MessageBody.of(forged), configured,
        configured.servers[0])  # type: ignore[attr-defined]
    assert result is not None and result.remove == (5,)
    assert result.prepend == (b"Authentication-Results: hub01.contoso.test; none\r\n",)
    assert result.response is None and "checks failed" in result.summary


@pytest.mark.parametrize("section, enabled", [
    ("", False),  # no [sender_id_config]: nothing is checked
    ('[sender_id_config]\nSpoofedDomainAction = "Reject"\n', True),
    ("[sender_id_config]\nEnabled = false\n", False)])
def test_the_section_turns_the_checks_on(tmp_path: Path, section: str, enabled: bool) -> None:
    org = load_organization(write_org(tmp_path, extra=section),
                            Hooks().registry.connector_types)
    assert org.sender_id_config.enabled is enabled


@pytest.mark.parametrize("value, expected", [
    ('""', ""), ('"Quarantine@Contoso.test"', "Quarantine@contoso.test")])
def test_the_quarantine_mailbox_may_be_left_empty(tmp_path: Path, value: str,
                                                 expected: str) -> None:
    """As docs/exchange.md shows it: '' is the postmaster."""
    org = load_organization(write_org(tmp_path, extra=(
        f'[[anti_phish_policy]]\nName = "Default"\nQuarantineMailbox = {value}\n')),
        Hooks().registry.connector_types)
    assert org.anti_phish_policy.quarantine_mailbox == expected
