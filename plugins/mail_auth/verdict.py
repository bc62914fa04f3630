"""From the checks' results to what happens to the message, the Exchange way.

The results are always stamped: one ``Authentication-Results`` field (RFC 8601) with this
server's authserv-id, at the top, after removing any incoming one that claims that id. Then
at most one action, the first that applies:

1. DMARC failed and the Default anti-phishing policy honours the sender's DMARC policy:
   ``p=reject`` -> ``DmarcRejectAction`` (Reject: ``550 5.7.1``; or Quarantine),
   ``p=quarantine`` -> ``DmarcQuarantineAction`` (Quarantine, or Deliver).
2. The From domain is one of the organization's accepted domains and neither SPF nor DKIM
   passed for it: spoofed, ``SpoofedDomainAction``.
3. SPF failed (and DMARC did not pass): ``SpoofedDomainAction`` (Exchange's Sender ID fail).
4. A check met a DNS failure (and DMARC did not pass): ``TempErrorAction`` (Reject answers
   ``451 4.7.x``: a DNS failure never refuses mail for good).

``BypassedSenderDomains`` and ``BypassedRecipients`` skip the actions, not the stamp.
"""

from __future__ import annotations

from collections.abc import Sequence

import authres
from authres.core import (
    AuthenticationResult,
    AuthenticationResultProperty,
    AuthenticationResultsHeader,
)

from hubport.core.config import Organization
from hubport.core.headers import ParsedMessage
from hubport.core.model import Inspection, SmtpResponse
from hubport.plugins.mail_auth.checks import Checks

__all__ = ["decide", "forged_results", "results_field", "unchecked_field"]

R = SmtpResponse
MAX_REASON = 200
_CONTEXT = authres.FeatureContext(authres)


def _reason(text: str) -> str | None:
    flat = " ".join(text.split())
    return flat[:MAX_REASON] or None


def _result(method: str, result: str, reason: str = "",
            **properties: str) -> AuthenticationResult:
    props = []
    for key, value in properties.items():
        if value:
            kind, _, name = key.partition("_")
            props.append(AuthenticationResultProperty(kind, name.replace("_", "-"), value))
    return AuthenticationResult(method=method, result=result, reason=_reason(reason),
                                properties=props)


def results_field(authserv_id: str, checks: Checks, override: str = "") -> bytes:
    """The Authentication-Results field, one result per line."""
    results = []
    if checks.spf_helo is not None:
        results.append(_result("spf", checks.spf_helo.result, checks.spf_helo.reason,
                               smtp_helo=checks.spf_helo.checked))
    results.append(_result("spf", checks.spf.result, checks.spf.reason,
                           smtp_mailfrom=checks.spf.checked))
    for d in checks.dkim or []:
        results.append(_result("dkim", d.result, d.reason, header_d=d.domain,
                               header_s=d.selector, header_a=d.algorithm, header_b=d.b))
    if not checks.dkim:
        results.append(_result("dkim", "none"))
    dm = checks.dmarc
    reason = dm.reason + (f"; {override}" if override else "")
    results.append(_result("dmarc", dm.result, reason, header_from=dm.from_domain,
                           policy_dmarc=dm.policy if dm.result in ("pass", "fail") else ""))
    results.append(_result("arc", checks.arc.result, checks.arc.reason))
    header = AuthenticationResultsHeader(_CONTEXT, authserv_id=authserv_id, results=[])
    head = str(header).split(";", 1)[0]  # "Authentication-Results: <authserv-id>"
    return (head + ";" + ";".join(f"\r\n\t{r}" for r in results) + "\r\n").encode()


def unchecked_field(authserv_id: str) -> bytes:
    """``Authentication-Results: <id>; none``: nothing could be checked (RFC 8601 §2.2)."""
    header = AuthenticationResultsHeader(_CONTEXT, authserv_id=authserv_id, results=[])
    return f"{header}\r\n".encode()


def forged_results(parsed: ParsedMessage, our_ids: Sequence[str]) -> tuple[int, ...]:
    """Positions of incoming Authentication-Results fields claiming one of ``our_ids``
    (RFC 8601 §5: they must go before ours is added)."""
    wanted = {i.lower() for i in our_ids if i}
    found = []
    for index, field in enumerate(parsed.fields):
        if field.lname != "authentication-results":
            continue
        try:
            claimed = AuthenticationResultsHeader.parse_value(_CONTEXT, field.text
                                                              ).authserv_id or ""
        except Exception:  # unparsable: judged by its first word
            claimed = next(iter(field.text.split(";", 1)[0].split()), "")
        if str(claimed).strip().lower() in wanted:
            found.append(index)
    return tuple(found)


def _arc_override(checks: Checks, trusted: Sequence[str]) -> str:
    """A trusted ARC sealer saw DMARC pass before the message was changed (RFC 8617 §7.2:
    local policy may honour it): the override's reason, or ''."""
    arc = checks.arc
    if arc.result != "pass" or arc.sealer.lower() not in {t.lower() for t in trusted}:
        return ""
    if "dmarc=pass" not in arc.sealed_results.lower().replace(" ", ""):
        return ""
    return f"arc override: {arc.sealer} (trusted ARC sealer) saw dmarc=pass"


def decide(checks: Checks, org: Organization, parsed: ParsedMessage, recipients: list[str],
           authserv_id: str, our_ids: Sequence[str]) -> Inspection:
    """The Inspection for a message with these results."""
    sender_id = org.sender_id_config
    policy = org.anti_phish_policy
    override = _arc_override(checks, sender_id.arc_trusted_sealers) \
        if checks.dmarc.result == "fail" else ""
    stamp = (results_field(authserv_id, checks, override),)
    removed = forged_results(parsed, our_ids)
    summary = checks.summary()
    domain = checks.from_domain or checks.spf.domain
    if sender_id.bypasses(domain, recipients):
        return Inspection(stamp, removed, summary=summary + " action=bypassed")
    action = _action(checks, org, override)
    if action is None:
        return Inspection(stamp, removed, summary=summary)
    kind, why = action
    summary += f" action={kind}"
    if kind == "Reject":
        return Inspection(stamp, removed, response=why, summary=summary)
    if kind == "Delete":
        return Inspection(stamp, removed, discard=True, summary=summary)
    if kind == "Quarantine":
        mailbox = policy.quarantine_mailbox or org.postmaster
        note = (f"X-Hubport-Quarantined: {checks.dmarc.result} dmarc ({checks.dmarc.policy});"
                f" for {', '.join(recipients)}\r\n").encode()
        return Inspection((*stamp, note), removed, redirect_to=(mailbox,),
                          summary=summary + f" quarantine={mailbox}")
    return Inspection(stamp, removed, summary=summary)  # StampStatus / Deliver


def _action(checks: Checks, org: Organization,
            override: str) -> tuple[str, SmtpResponse] | None:
    sender_id = org.sender_id_config
    policy = org.anti_phish_policy
    dm = checks.dmarc
    if dm.result == "fail" and policy.honor_dmarc_policy and not override:
        if dm.disposition == "reject":
            return policy.dmarc_reject_action, R(
                550, "5.7.1", f"Message rejected: {dm.from_domain}'s DMARC policy is reject"
                              " and neither SPF nor DKIM passed for it")
        if dm.disposition == "quarantine":
            return policy.dmarc_quarantine_action, R(250, "2.0.0", "quarantined")
    if dm.result == "pass":
        return None
    temporary = checks.spf.result == "temperror" or dm.result == "temperror"
    if _own_domain(checks, org) and not temporary:
        return sender_id.spoofed_domain_action, R(
            550, "5.7.1", f"Message claims to be from {checks.from_domain}, a domain of this"
                          " organization, but neither SPF nor DKIM vouch for it")
    if checks.spf.result == "fail":
        return sender_id.spoofed_domain_action, R(
            550, "5.7.23", f"SPF validation failed: the sending host is not allowed to send"
                           f" for {checks.spf.domain}")
    if temporary:
        return sender_id.temp_error_action, R(
            451, "4.7.24" if checks.spf.result == "temperror" else "4.7.1",
            "Sender authentication could not be completed (DNS failure); try again later")
    return None


def _own_domain(checks: Checks, org: Organization) -> bool:
    """The From domain is ours and nothing vouches for it: SPF passed for a MAIL FROM in
    the same organizational domain, or a DKIM signature of it passed."""
    domain = checks.from_domain
    if not domain or org.accepted_domain_for(domain) is None:
        return False
    from hubport.plugins.mail_auth.dmarc import aligned

    if checks.spf.result == "pass" and aligned(checks.spf.domain, domain, "r"):
        return False
    return not any(d.result == "pass" and aligned(d.domain, domain, "r")
                   for d in checks.dkim)
