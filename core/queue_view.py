"""Queues and queued messages under Exchange's property names: Get-Queue's and
Get-Message's tables and lists, and the objects the stages after them work on
(``Get-Queue | Select-Object Identity,MessageCount``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

__all__ = ["clock", "message_properties", "queue_list", "queue_properties", "queue_table"]


def clock(value: object) -> str:
    if not isinstance(value, (int, float)):
        return ""
    return datetime.fromtimestamp(value).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def queue_properties(r: dict[str, Any]) -> dict[str, Any]:
    """One queue as Get-Queue | Format-List shows it."""
    return {"Identity": r["identity"], "DeliveryType": r["delivery_type"],
            "NextHopDomain": r["next_hop"], "Status": r["status"],
            "MessageCount": r["message_count"], "LastRetryTime": clock(r.get("last_retry")),
            "NextRetryTime": clock(r.get("next_retry")),
            "RetryCount": r.get("retry_count") or 0, "LastError": r.get("last_error") or "",
            "NextHopConnector": r.get("connector") or "", "Failover": r.get("failover") or ""}


def message_properties(r: dict[str, Any]) -> dict[str, Any]:
    """One queued message as Get-Message | Format-List shows it; Recipients holds each
    recipient with its status."""
    return {"Identity": r["identity"], "FromAddress": r["from"] or "<>",
            "Subject": r["subject"], "Status": r["status"], "Size": r["size"],
            "Queue": r["queue_identity"], "InternetMessageId": r["message_id"],
            "DateReceived": clock(r.get("received")),
            "ExpirationTime": clock(r.get("expires")),
            "NextRetryTime": clock(r.get("next_retry")),
            "LastError": r.get("last_error") or "", "Source": r.get("source") or "",
            "Recipients": [f"{p['address']} {p['status']}"
                           + (" Suspended" if p.get("suspended") else "")
                           + (f" ({p['last_error']})" if p.get("last_error") else "")
                           for p in r["recipients"]]}


def queue_table(rows: list[dict[str, Any]], kind: str) -> str:
    if kind == "queue":
        lines = [f"{'Identity':<24} {'DeliveryType':<26} {'Status':<10} {'MessageCount':>12}"
                 f"  {'NextRetryTime':<19}  NextHopDomain"]
        lines += [f"{r['identity']:<24} {r['delivery_type']:<26} {r['status']:<10} "
                  f"{r['message_count']:>12}  {clock(r.get('next_retry')):<19}  {r['next_hop']}"
                  for r in rows]
    else:
        lines = [f"{'Identity':<28} {'FromAddress':<30} {'Status':<10} {'Size':>8}  Subject"]
        lines += [f"{r['identity']:<28} {(r['from'] or '<>'):<30} {r['status']:<10} "
                  f"{r['size']:>8}  {r['subject']}" for r in rows]
    return "\n".join(lines)


def queue_list(rows: list[dict[str, Any]], kind: str) -> str:
    """Format-List: every property, recipients one per line with their status."""
    blocks = []
    for r in rows:
        properties = queue_properties(r) if kind == "queue" else message_properties(r)
        recipients = properties.pop("Recipients", [])
        if kind == "queue":
            properties.pop("NextHopConnector")
            if not properties["Failover"]:
                properties.pop("Failover")
        else:
            properties.pop("Source")
        fields = [*properties.items(), *(("Recipient", text) for text in recipients)]
        blocks.append("\n".join(f"{name:<18}: {value}" for name, value in fields))
    return "\n\n".join(blocks)
