"""The inbound checks of one message: SPF (HELO and MAIL FROM), DKIM, DMARC and ARC.

Synchronous, for a worker thread: pyspf, dkimpy and the DMARC lookup block on DNS. Every
outcome is a result string of RFC 8601's registry, never an exception: malformed
signatures, key records that are not keys, SPF records past the lookup limits, DMARC
records with unknown tags all become ``neutral``/``permerror``/``none`` as the RFCs say,
and a DNS failure is ``temperror``.
"""

from __future__ import annotations

import email.utils
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dkim
import spf
from dkim.util import InvalidTagValueList, parse_tag_value

from hubport.core.headers import HeaderField, ParsedMessage, decode_8bit
from hubport.plugins.mail_auth import dmarc
from hubport.plugins.mail_auth.dns_txt import Lookup

__all__ = ["Checks", "DkimResult", "SpfResult", "check_message"]

#: signatures verified per message (RFC 6376 §6.1: verifiers may limit them); the rest are
#: reported as not checked
MAX_SIGNATURES = 8
#: pyspf's whole-check time limit (RFC 7208 §4.6.4 suggests at least 20 seconds)
SPF_QUERY_TIME = 20


@dataclass(frozen=True)
class SpfResult:
    result: str  # pass fail softfail neutral none temperror permerror
    identity: str  # "mailfrom" or "helo"
    checked: str  # the address or name checked
    reason: str = ""

    @property
    def domain(self) -> str:
        return self.checked.rpartition("@")[2].lower()


@dataclass(frozen=True)
class DkimResult:
    result: str  # pass fail neutral temperror permerror policy
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    b: str = ""  # the first 8 characters of b= (RFC 6008), telling signatures apart
    reason: str = ""


@dataclass(frozen=True)
class ArcResult:
    result: str  # pass fail none
    sealer: str = ""  # d= of the latest ARC-Seal
    sealed_results: str = ""  # the latest ARC-Authentication-Results' results
    reason: str = ""


@dataclass(frozen=True)
class Checks:
    spf_helo: SpfResult | None
    spf: SpfResult
    dkim: list[DkimResult]
    dmarc: dmarc.DmarcResult
    arc: ArcResult

    @property
    def from_domain(self) -> str:
        return self.dmarc.from_domain

    def summary(self) -> str:
        """For the tracking log: ``spf=pass dkim=pass(contoso.test) dmarc=pass arc=none``."""
        dkims = " ".join(f"dkim={d.result}({d.domain})" if d.domain else f"dkim={d.result}"
                         for d in self.dkim) or "dkim=none"
        return (f"spf={self.spf.result} {dkims} dmarc={self.dmarc.result}"
                f"{'(' + self.dmarc.disposition + ')' if self.dmarc.result == 'fail' else ''}"
                f" arc={self.arc.result}")


# -- SPF -----------------------------------------------------------------------------------

_spf_lookup = threading.local()
_original_spf_lookup: Callable[..., Any] = spf.DNSLookup


def _spf_dns(name: str, qtype: str, strict: bool = True, timeout: float = 20) -> Any:
    """pyspf's DNS function (a module global), dispatched to the Lookup of the check that
    runs in this thread."""
    lookup: Lookup | None = getattr(_spf_lookup, "lookup", None)
    if lookup is None:
        return _original_spf_lookup(name, qtype, strict, timeout)
    return lookup.spf_lookup(name, qtype, strict, timeout)


spf.DNSLookup = _spf_dns


def check_spf(lookup: Lookup, ip: str, sender: str, helo: str) -> tuple[SpfResult | None,
                                                                           SpfResult]:
    """RFC 7208: the HELO identity (when it is a domain name), then MAIL FROM (for the null
    sender, postmaster@<HELO>: §2.4)."""
    _spf_lookup.lookup = lookup
    try:
        helo_result = None
        if _is_domain(helo):
            helo_result = _spf_one(ip, f"postmaster@{helo}", helo, "helo", helo)
        identity = sender or f"postmaster@{helo}"
        if not sender and helo_result is not None:
            mail_result = SpfResult(helo_result.result, "mailfrom", identity,
                                    helo_result.reason)
        elif "@" not in identity or not _is_domain(identity.rpartition("@")[2]):
            mail_result = SpfResult("none", "mailfrom", identity, "no domain to check")
        else:
            mail_result = _spf_one(ip, identity, helo, "mailfrom", identity)
        return helo_result, mail_result
    finally:
        _spf_lookup.lookup = None


def _spf_one(ip: str, sender: str, helo: str, identity: str, checked: str) -> SpfResult:
    try:
        result, _code, explanation = spf.query(
            i=ip, s=sender, h=helo, querytime=SPF_QUERY_TIME).check()
    except Exception as exc:  # pyspf on input it did not expect: the record is broken
        return SpfResult("permerror", identity, checked, f"{type(exc).__name__}: {exc}")
    result = {"error": "temperror", "unknown": "permerror"}.get(result, result)
    return SpfResult(str(result), identity, checked, str(explanation))


_DOMAIN = re.compile(r"(?=.{1,253}$)([A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)+"
                     r"[A-Za-z0-9-]{1,63}")


def _is_domain(text: str) -> bool:
    return bool(_DOMAIN.fullmatch(text.rstrip(".")))


# -- DKIM ----------------------------------------------------------------------------------


class _Captured:
    """A logger for dkimpy that keeps its error lines: dkimpy logs why a key could not be
    used (DNS timeout, no key, bad key) and returns False, which alone reads as 'fail'."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, message: str, *args: Any) -> None:
        self.errors.append(message % args if args else message)

    warning = error

    def debug(self, *args: Any) -> None:
        pass

    info = debug


def check_dkim(message: bytes, lookup: Lookup) -> list[DkimResult]:
    """One result per DKIM-Signature, topmost first (up to MAX_SIGNATURES)."""
    captured = _Captured()
    try:
        verifier = dkim.DKIM(message, logger=captured, minkey=1024, timeout=5)
    except Exception as exc:  # dkimpy could not parse the message
        return [DkimResult("permerror", reason=f"message not parsable: {exc}")]
    signatures = [value for name, value in verifier.headers
                  if name.lower() == b"dkim-signature"]
    results = []
    for index, value in enumerate(signatures[:MAX_SIGNATURES]):
        results.append(_verify_one(verifier, index, value, lookup, captured))
    if len(signatures) > MAX_SIGNATURES:
        results.append(DkimResult("policy", reason=f"{len(signatures) - MAX_SIGNATURES}"
                                                   f" more signatures not checked (at most"
                                                   f" {MAX_SIGNATURES} are)"))
    return results


def _verify_one(verifier: dkim.DKIM, index: int, value: bytes, lookup: Lookup,
                captured: _Captured) -> DkimResult:
    try:
        tags = parse_tag_value(value)
    except InvalidTagValueList as exc:
        return DkimResult("neutral", reason=f"signature syntax: {exc}")
    domain = _text(tags.get(b"d", b""))
    selector = _text(tags.get(b"s", b""))
    algorithm = _text(tags.get(b"a", b""))
    b = re.sub(r"\s+", "", _text(tags.get(b"b", b"")))[:8]
    shown = {"domain": domain, "selector": selector, "algorithm": algorithm, "b": b}
    captured.errors.clear()
    try:
        good = verifier.verify(idx=index, dnsfunc=lookup.dkim_txt)
    except dkim.DnsTimeoutError as exc:
        return DkimResult("temperror", reason=str(exc), **shown)
    except (dkim.ValidationError, dkim.MessageFormatError) as exc:
        if "body hash mismatch" in str(exc):  # the body changed since it was signed
            return DkimResult("fail", reason="body hash did not verify", **shown)
        return DkimResult("neutral", reason=f"signature not valid: {exc}", **shown)
    except dkim.KeyFormatError as exc:
        return DkimResult("permerror", reason=f"key: {exc}", **shown)
    except Exception as exc:  # anything else dkimpy meets in hostile input
        return DkimResult("permerror", reason=f"{type(exc).__name__}: {exc}", **shown)
    if good:
        return DkimResult("pass", **shown)
    why = "; ".join(captured.errors)
    if "DnsTimeoutError" in why:
        return DkimResult("temperror", reason=why, **shown)
    if why:  # no key, or a key record that is not a key (RFC 6376 §6.1.2: PERMFAIL)
        return DkimResult("permerror", reason=why, **shown)
    return DkimResult("fail", reason="signature did not verify", **shown)


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace").strip()


# -- ARC -----------------------------------------------------------------------------------


def check_arc(message: bytes, lookup: Lookup) -> ArcResult:
    """RFC 8617 §5.2: the chain's validation status, and who sealed it last."""
    if b"\narc-seal:" not in message[:message.find(b"\r\n\r\n") + 2].lower() and \
            not message.lower().startswith(b"arc-seal:"):
        return ArcResult("none")
    captured = _Captured()
    try:
        cv, results, reason = dkim.arc_verify(message, logger=captured,
                                              dnsfunc=lookup.dkim_txt, minkey=1024, timeout=5)
    except dkim.DnsTimeoutError as exc:
        return ArcResult("fail", reason=f"temperror: {exc}")
    except Exception as exc:
        return ArcResult("fail", reason=f"{type(exc).__name__}: {exc}")
    result = _text(cv) if isinstance(cv, bytes) else str(cv)
    sealer = ""
    if results:
        latest = max(results, key=lambda r: int(r.get("instance", 0)))
        sealer = _text(latest.get("as-domain", b"")) if isinstance(
            latest.get("as-domain"), bytes) else str(latest.get("as-domain", ""))
    return ArcResult(result, sealer, _sealed_results(message),
                     reason=_text(reason) if isinstance(reason, bytes) else str(reason or ""))


def _sealed_results(message: bytes) -> str:
    """The results of the latest ARC-Authentication-Results (what that sealer saw)."""
    latest, instance = "", -1
    from hubport.core.headers import parse_header_section

    try:
        parsed = parse_header_section(message)
    except Exception:
        return ""
    for field_ in parsed.get_all("ARC-Authentication-Results"):
        text = field_.text
        found = re.match(r"\s*i\s*=\s*(\d+)\s*;(.*)", text, re.S)
        if found and int(found.group(1)) > instance:
            instance, latest = int(found.group(1)), found.group(2)
    return latest


# -- From ----------------------------------------------------------------------------------


def from_domain(parsed: ParsedMessage) -> tuple[str, str]:
    """(the RFC5322.From domain, '' ) or ('', why there is none usable: RFC 7489 §6.6.1)."""
    fields: list[HeaderField] = parsed.get_all("From")
    if len(fields) != 1:
        return "", f"{len(fields)} From fields"
    addresses = [a for _n, a in email.utils.getaddresses([decode_8bit(fields[0].value_bytes)])
                 if a]
    if len(addresses) != 1:
        return "", f"From names {len(addresses)} addresses"
    domain = addresses[0].rpartition("@")[2].strip().rstrip(".>").lower()
    if not domain or not _is_domain(domain):
        return "", "From has no domain"
    return domain, ""


# -- all of them ---------------------------------------------------------------------------


def check_message(message: bytes | None, parsed: ParsedMessage, *, ip: str, helo: str,
                  sender: str, lookup: Lookup) -> Checks:
    """Every check of one message, as received from ``ip`` after ``HELO helo`` and
    ``MAIL FROM:<sender>``; ``message`` None: too large to hold whole, so its signatures
    are reported unchecked (``policy``) and only SPF and DMARC decide."""
    helo_spf, mail_spf = check_spf(lookup, ip, sender, helo)
    if message is None:
        dkims = [DkimResult("policy", reason="message too large to verify")] \
            if parsed.get("DKIM-Signature") is not None else []
        arc = ArcResult("none", reason="message too large to verify")
    else:
        dkims = check_dkim(message, lookup)
        arc = check_arc(message, lookup)
    domain, problem = from_domain(parsed)
    if problem:
        verdict = dmarc.DmarcResult("permerror", reason=problem)
    else:
        spf_for_dmarc = mail_spf if sender else (helo_spf or mail_spf)
        verdict = dmarc.evaluate(lookup, domain, spf_for_dmarc.result, spf_for_dmarc.domain,
                                 [d.domain for d in dkims if d.result == "pass"])
        if verdict.result == "fail" and (spf_for_dmarc.result == "temperror" or any(
                d.result == "temperror" for d in dkims)):
            # a check that could not finish might have passed: not a failure yet
            verdict = dmarc.DmarcResult("temperror", domain, verdict.policy, "none",
                                        "an SPF or DKIM lookup failed")
    return Checks(helo_spf, mail_spf, dkims, verdict, arc)
