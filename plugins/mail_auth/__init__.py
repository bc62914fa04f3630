"""Mail authentication: DKIM signing and ARC sealing of outbound mail, and SPF, DKIM, DMARC
and ARC checks of mail from the Internet (docs/exchange.md, "Mail authentication").

The organization's objects (``[[dkim_signing_config]]``, ``[sender_id_config]``,
``[[anti_phish_policy]]``) are read by the core (core/mail_auth_config.py) and the keys are
server-local files (core/dkim_keys.py); this plugin does the work through two hooks:
``authenticate_sender`` (the receive connector asks it about each message from the
Internet) and ``stamp_outbound`` (a Send connector asks it for the fields to add to a
message leaving the organization). The cryptography and the record parsing are dkimpy's,
pyspf's, authres's and publicsuffixlist's, with RSA through OpenSSL; both hooks run that
work in a thread pool of their own, off the event loop.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import structlog

from hubport.core import hookimpl
from hubport.core.body import MessageBody
from hubport.core.config import Organization, TransportServer
from hubport.core.headers import ParsedMessage
from hubport.core.model import Inspection, ReceiveSession

log = structlog.get_logger("hubport.mail_auth")

#: the largest message signed or verified: dkimpy hashes a message it holds whole, and no
#: other path of the daemon holds a large message whole (core/body.py). Larger mail goes
#: unsigned, and its signatures unverified (reported as such), with a log line.
MAX_WHOLE = 64 * 1024 * 1024

#: the checks wait on DNS most of the time: several at once
_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mail-auth")
#: signing is CPU-bound (RSA in OpenSSL, without the GIL): one thread per process, so that
#: the daemon's workers (one per core) do not crowd the cores with signers
_signing_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dkim-sign")


def authserv_id(org: Organization, server: TransportServer) -> str:
    return (org.sender_id_config.authserv_id or server.fqdn).lower()


def our_authserv_ids(org: Organization) -> list[str]:
    """Every id an Authentication-Results of this organization may carry: the configured
    one and each transport server's FQDN (another hub's claim is as forged as ours)."""
    return [org.sender_id_config.authserv_id, *(s.fqdn for s in org.servers)]


async def _in_pool(function: Any, *args: Any, pool: ThreadPoolExecutor = _pool,
                   **kwargs: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(
        pool, partial(function, *args, **kwargs))


def _libraries() -> None:
    """dkimpy, pyspf and authres are loaded on first use, not by every ``hubport`` command
    that loads the plugins; dkimpy's RSA then goes through OpenSSL."""
    from hubport.plugins.mail_auth import openssl_rsa

    openssl_rsa.install()


@hookimpl
async def authenticate_sender(session: ReceiveSession, headers: ParsedMessage,
                              body: MessageBody, organization: Organization,
                              server: TransportServer) -> Inspection | None:
    if not organization.sender_id_config.enabled:
        return None
    _libraries()
    from hubport.plugins.mail_auth.checks import check_message
    from hubport.plugins.mail_auth.dns_txt import lookup_for
    from hubport.plugins.mail_auth.verdict import decide

    lookup = lookup_for(server.external_dns_servers)
    sender = session.mail_from.address if session.mail_from is not None else ""
    recipients = [r.address for r in session.recipients]

    def work() -> Inspection:
        whole = body.read() if body.size <= MAX_WHOLE else None
        checks = check_message(whole, headers, ip=session.remote_ip,
                               helo=session.helo, sender=sender, lookup=lookup)
        return decide(checks, organization, headers, recipients,
                      authserv_id(organization, server), our_authserv_ids(organization))

    def failed(error: Exception) -> Inspection:
        """Input no check foresaw: the message is stamped as unchecked, and forged
        results claiming us still go (a crash must not let them through)."""
        from hubport.plugins.mail_auth.verdict import forged_results, unchecked_field

        log.error("sender checks failed; the message is stamped unchecked",
                  session=session.session_id, error=repr(error))
        return Inspection((unchecked_field(authserv_id(organization, server)),),
                          forged_results(headers, our_authserv_ids(organization)),
                          summary=f"checks failed: {type(error).__name__}")

    def guarded() -> Inspection:
        try:
            return work()
        except Exception as exc:
            return failed(exc)

    inspection: Inspection = await _in_pool(guarded)
    log.info("sender authenticated", session=session.session_id, results=inspection.summary)
    return inspection


@hookimpl
async def stamp_outbound(item: Any, connector: Any, content: bytes | MessageBody,
                         organization: Organization, server: TransportServer
                         ) -> list[bytes] | None:
    signing = any(c.enabled for c in organization.dkim_signing_configs)
    if not signing:
        return None
    _libraries()
    from hubport.plugins.mail_auth.signing import arc_seal, dkim_signatures

    sealers = our_authserv_ids(organization)

    if isinstance(content, MessageBody) and content.size > MAX_WHOLE:
        log.warning("message too large to sign; it leaves unsigned", size=content.size,
                    limit=MAX_WHOLE, message=item.message.internal_id)
        return None

    def work() -> list[bytes]:
        data = content.read() if isinstance(content, MessageBody) else content
        signatures = dkim_signatures(data, organization, server)
        signed = b"".join(signatures) + data
        seal = arc_seal(signed, organization, server, sealers)
        return [*seal, *signatures]

    fields: list[bytes] = await _in_pool(work, pool=_signing_pool)
    return fields or None
