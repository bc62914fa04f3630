"""DMARC (RFC 7489): the policy record, identifier alignment and the disposition.

The record is found at ``_dmarc.<From domain>``, else at ``_dmarc.<organizational
domain>`` (the registrable domain under the Public Suffix List, ``publicsuffixlist``). A
message passes when SPF passed for an aligned MAIL FROM domain or a DKIM signature passed
for an aligned ``d=``; relaxed alignment (the default) compares organizational domains,
strict the domains themselves. A failing message gets the record's ``p=`` (``sp=`` when the
From domain is a subdomain of the one whose record applies), applied to ``pct=`` percent of
mail; the rest get the next milder policy (§6.6.4).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from publicsuffixlist import PublicSuffixList

from hubport.plugins.mail_auth.dns_txt import Lookup, TemporaryDnsError

__all__ = ["DmarcRecord", "DmarcResult", "evaluate", "organizational_domain", "parse_record"]

POLICIES = ("none", "quarantine", "reject")
MILDER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


@dataclass(frozen=True)
class DmarcRecord:
    policy: str  # p=
    subdomain_policy: str | None = None  # sp=
    percent: int = 100  # pct=
    dkim_alignment: str = "r"  # adkim=
    spf_alignment: str = "r"  # aspf=


@dataclass(frozen=True)
class DmarcResult:
    """``result`` is pass, fail, none, temperror or permerror (RFC 8601 §2.7 via RFC 7489
    §11.2); ``policy`` the one that applies (none/quarantine/reject), ``disposition`` what
    is left of it after pct= (the action to take)."""

    result: str
    from_domain: str = ""
    policy: str = "none"
    disposition: str = "none"
    reason: str = ""


@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


@lru_cache(maxsize=10_000)
def organizational_domain(domain: str) -> str:
    """The registrable domain (``mail.contoso.test`` -> ``contoso.test``)."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


def parse_record(text: str) -> DmarcRecord | None:
    """A DMARC record, or None when ``text`` is not a valid one (§6.6.3: such a record is
    ignored). Unknown tags are ignored (§6.3); a bad ``p=`` with a valid ``rua=`` reads as
    ``p=none``; bad values of the optional tags take their defaults."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            return None
        tags.setdefault(key.strip().lower(), value.strip())
    first = text.split(";", 1)[0].replace(" ", "").lower()
    if first != "v=dmarc1":
        return None
    policy = tags.get("p", "").lower()
    if policy not in POLICIES:
        if tags.get("rua"):
            policy = "none"
        else:
            return None
    sub = tags.get("sp", "").lower()
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        pct = 100
    return DmarcRecord(
        policy=policy,
        subdomain_policy=sub if sub in POLICIES else None,
        percent=min(100, max(0, pct)),
        dkim_alignment="s" if tags.get("adkim", "r").lower() == "s" else "r",
        spf_alignment="s" if tags.get("aspf", "r").lower() == "s" else "r")


def _find_record(lookup: Lookup, domain: str) -> tuple[DmarcRecord | None, str]:
    """(record, the domain it was found at); TemporaryDnsError passes through."""
    for candidate in dict.fromkeys((domain, organizational_domain(domain))):
        texts = [t.decode("utf-8", "replace") for t in lookup.txt(f"_dmarc.{candidate}")]
        records = [t for t in texts if t.replace(" ", "").lower().startswith("v=dmarc1")]
        if len(records) == 1:
            record = parse_record(records[0])
            if record is not None:
                return record, candidate
        # several records, or an invalid one: as if none were published (§6.6.3)
    return None, ""


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    identifier, from_domain = identifier.lower().rstrip("."), from_domain.lower()
    if mode == "s":
        return identifier == from_domain
    return organizational_domain(identifier) == organizational_domain(from_domain)


def evaluate(lookup: Lookup, from_domain: str, spf_result: str, spf_domain: str,
             dkim_passes: list[str], rng: random.Random | None = None) -> DmarcResult:
    """The DMARC result of a message whose From domain is ``from_domain``, given SPF's
    result for ``spf_domain`` and the ``d=`` of every DKIM signature that passed."""
    try:
        record, found_at = _find_record(lookup, from_domain)
    except TemporaryDnsError as exc:
        return DmarcResult("temperror", from_domain, reason=str(exc))
    if record is None:
        return DmarcResult("none", from_domain)
    policy = record.policy
    if found_at != from_domain and record.subdomain_policy is not None:
        policy = record.subdomain_policy
    spf_ok = spf_result == "pass" and aligned(spf_domain, from_domain, record.spf_alignment)
    dkim_ok = any(aligned(d, from_domain, record.dkim_alignment) for d in dkim_passes)
    if spf_ok or dkim_ok:
        how = "aligned SPF" if spf_ok else "aligned DKIM"
        return DmarcResult("pass", from_domain, policy, "none", how)
    sampled = (rng or random).randrange(100) < record.percent
    disposition = policy if sampled else MILDER[policy]
    reason = "neither SPF nor DKIM passed aligned with the From domain"
    if not sampled:
        reason += f" (pct={record.percent}: not sampled, {disposition} applied)"
    return DmarcResult("fail", from_domain, policy, disposition, reason)
