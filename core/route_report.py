"""``hubport test-route``: why a recipient goes where it goes.

Runs the real categorizer of one server (with the plugins' categorize and route hooks) on a
message that exists only in memory, and reports each step: what the recipient resolved to,
then, for every address that needed a connector, each candidate with its address space,
specificity and aggregate cost (the site-link path that makes it up, link by link), the
connectors that could not serve it and why, and the rule that chose. Nothing is queued or
sent. The same decisions the daemon makes, because it is the same code.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from hubport.core.body import MessageBody
from hubport.core.categorizer import Categorizer
from hubport.core.directory import RecipientDirectory
from hubport.core.model import MailFrom, NextHop, QueuedMessage, QueuedRecipient, RecipientStatus
from hubport.core.routing import RouteCandidate, RouteExplanation

if TYPE_CHECKING:
    from hubport.core.config import Organization, TransportServer
    from hubport.core.hooks import Hooks

__all__ = ["format_report", "route_report"]

PROXIMITY = {0: "this server", 1: "same site", 2: "remote site"}


async def route_report(org: Organization, server: TransportServer, hooks: Hooks,
                       recipient: str, *, sender: str = "", size: int = 0,
                       failover: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The report as plain data (``--json`` prints it as it is). ``failover`` is the
    running daemon's connector failover state (``get-failover``), when it answered."""
    now = time.time()
    message = QueuedMessage(
        id=0, internal_id="test-route", message_id="<test-route@hubport>",
        mail_from=MailFrom(sender), body=MessageBody.of(b""), size=size, source="TEST-ROUTE",
        source_name="", subject="", received_at=now, expires_at=now + 86400,
        recipients=[QueuedRecipient(0, 0, recipient, RecipientStatus.SUBMITTED)])
    directory = RecipientDirectory(org)
    categorizer = Categorizer(org, server, directory, hooks)
    categorizer.explanations = []
    moved = frozenset(f["connector"].lower() for f in failover or ()
                      if f.get("moved_at") is not None)
    if org.transport_config.connector_failover == "NextCost":
        categorizer.avoided = lambda: moved
    result = await categorizer.categorize(message)
    return {
        "recipient": recipient, "sender": sender, "size": size,
        "server": server.name, "site": server.site,
        "categorizer": [{
            "address": d.address, "outcome": d.kind, "event": d.event or None,
            "related": d.related or None,
            "next_hop": _hop(d.next_hop), "response": str(d.response) if d.response else None,
            "mailbox_server": _mailbox_server(directory, d.address, d.next_hop),
            "path": _path_to_hop(org, server, d.next_hop,
                                 _mailbox_server(directory, d.address, d.next_hop)),
        } for d in result.decisions],
        "routing": [_explained(org, server, address, addr_type, e)
                    for address, addr_type, e in categorizer.explanations],
        "connector_failover": org.transport_config.connector_failover,
        "failover": failover if failover is not None else None,
    }


def _explained(org: Organization, server: TransportServer, address: str, addr_type: str,
               explained: RouteExplanation) -> dict[str, Any]:
    decision = explained.decision
    chosen = decision.candidate
    return {
        "address": address, "address_type": addr_type,
        "candidates": [_candidate(org, server, c) for c in explained.candidates],
        "eliminated": [{"connector": name, "why": why} for name, why in explained.eliminated],
        "chosen": chosen.name if chosen else None,
        "rule": explained.rule,
        "outcome": ("route" if chosen else "fail" if decision.failure else "unreachable"),
        "response": str(decision.failure) if decision.failure else None,
    }


def _candidate(org: Organization, server: TransportServer, c: RouteCandidate) -> dict[str, Any]:
    return {
        "connector": c.name, "address_space": f"{c.address_space.type}:"
                                              f"{c.address_space.space}",
        "specificity": c.specificity, "address_space_cost": c.address_space.cost,
        "site_cost": c.cost - c.address_space.cost, "cost": c.cost,
        "proximity": PROXIMITY.get(c.proximity, str(c.proximity)),
        "source_server": c.source_server or None,
        "next_hop": _hop(c.next_hop), "path": _site_path(org, server, c.source_server),
    }


def _hop(hop: NextHop | None) -> dict[str, str] | None:
    if hop is None:
        return None
    return {"delivery_type": hop.delivery_type, "domain": hop.domain,
            "connector": hop.connector}


def _mailbox_server(directory: RecipientDirectory, address: str,
                    hop: NextHop | None) -> str | None:
    """The hub holding the mailbox a relay carries a recipient to."""
    if hop is None or not hop.delivery_type.startswith("SmtpRelay"):
        return None
    mailbox = directory.mailbox(address)
    return mailbox.server if mailbox is not None else None


def _path_to_hop(org: Organization, server: TransportServer, hop: NextHop | None,
                 destination: str | None = None) -> list[dict[str, Any]] | None:
    """The site links a relay crosses, to the mailbox's hub when there is one (the next hop
    may be a hub site on the way), else to the hub or site the next hop names; None for
    this server."""
    if hop is None or not hop.delivery_type.startswith("SmtpRelay"):
        return None
    return _site_path(org, server, destination or hop.domain)


def _site_path(org: Organization, server: TransportServer,
               name: str) -> list[dict[str, Any]] | None:
    """The least-cost path from this server's site to server or site ``name``."""
    if not name:
        return None
    try:
        site = org.server(name).site
    except KeyError:
        site = name
    path = org.site_path(server.site, site)
    if path is None:
        return None
    return [{"link": step.link, "site": step.site, "cost": step.cost} for step in path]


def format_report(report: dict[str, Any]) -> str:
    """The report for a person: one block per step."""
    lines = [f"Test-Route {report['recipient']} from {report['sender'] or '<>'}"
             f" ({report['size']} bytes) on {report['server']} (site {report['site']})", "",
             "Categorizer:"]
    for d in report["categorizer"]:
        how = f" ({d['event']} from {d['related']})" if d["related"] else ""
        lines.append(f"  {d['address']}: {d['outcome']}{how}")
        if d["next_hop"]:
            lines.append(f"    next hop {_show_hop(d['next_hop'])}")
            if d.get("mailbox_server"):
                lines.append(f"      mailbox on {d['mailbox_server']}")
            lines += _show_path(d["path"], report["site"], "      ")
        if d["response"]:
            lines.append(f"    {d['response']}")
    for r in report["routing"]:
        lines += ["", f"Routing {r['address_type']}:{r['address']}:"]
        if not r["candidates"]:
            lines.append("  no candidate")
        for rank, c in enumerate(r["candidates"], 1):
            mark = "*" if c["connector"] == r["chosen"] and rank == 1 else " "
            lines.append(
                f" {mark}{rank}. {c['connector']}: address space {c['address_space']}"
                f" (specificity {c['specificity']}), cost {c['cost']} = site links"
                f" {c['site_cost']} + address space {c['address_space_cost']},"
                f" {c['proximity']}{' on ' + c['source_server'] if c['source_server'] else ''},"
                f" next hop {_show_hop(c['next_hop'])}")
            lines += _show_path(c["path"], report["site"], "      ")
        for e in r["eliminated"]:
            lines.append(f"    eliminated {e['connector']}: {e['why']}")
        if r["chosen"]:
            lines.append(f"  chosen: {r['chosen']}, by {r['rule']}")
        else:
            lines.append(f"  outcome: {r['outcome']}"
                         + (f" ({r['response']})" if r["response"] else ""))
    lines += ["", f"Connector failover: {report['connector_failover']}"]
    if report["failover"] is None:
        lines.append("  (no daemon answered: the failover state of the running server is"
                     " not known)")
    for f in report["failover"] or ():
        lines.append(f"  {f['connector']}: {f['describe']}")
    return "\n".join(lines)


def _show_hop(hop: dict[str, str]) -> str:
    via = f" via {hop['connector']}" if hop["connector"] else ""
    return f"{hop['delivery_type']} {hop['domain']}{via}"


def _show_path(path: list[dict[str, Any]] | None, site: str, indent: str) -> list[str]:
    if path is None:
        return []
    if not path:
        return [f"{indent}site path: within {site}"]
    steps = " ".join(f"-[{s['link']} {s['cost']}]-> {s['site']}" for s in path)
    return [f"{indent}site path: {site} {steps}"
            f" (cost {sum(s['cost'] for s in path)})"]
