"""Benchmark: end-to-end relay in messages per second, hubport vs Postfix, to one sink.

SMTP in → durable queue → categorizer → Send connector → smart host. The smart host is
Postfix's ``smtp-sink`` on a loopback port; the load is ``smtp-source`` (20 concurrent
sessions reusing their connections, 2 KB messages, one external recipient). The clock runs
from the first connection until the sink has counted every message, so acceptance and
delivery are both inside the figure. Postfix gets the same load in the same run, relaying
with ``relayhost = [127.0.0.1]:<sink>`` (a private instance, ``bench/peers.py``).

    .venv/bin/python bench/relay.py [--messages 5000] [--sessions 20] [--runs 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from peers import (
    POSTFIX,
    SMTP_SINK,
    SMTP_SOURCE,
    bench_org,
    free_port,
    hubport,
    postfix,
    prepare_base,
    require_tools,
    sink,
    smtp_source,
)
from report import BASELINE, collect, common_arguments, emit

SMART_HOST = """
[[send_connector]]
Name = "Smart host"
AddressSpaces = ["*;1"]
DNSRoutingEnabled = false
SmartHosts = ["[127.0.0.1]"]
Port = {sink}
SmtpMaxMessagesPerConnection = 1000
"""
RECIPIENT = "someone@fabrikam.example"


def relay_rate(server: str, root: Path, messages: int, sessions: int, *,
               sender: str = "sender@example.org", commands: tuple[str, ...] = ()) -> float:
    """Messages per second from ``sender``; ``commands``: cmdlets run on hubport's
    organization before it starts (bench/dkim_relay.py turns signing on)."""
    with sink(root.parent) as peer:
        if server == "hubport":
            port = free_port()
            context = hubport(root, bench_org(
                port, mailbox=None, relay=True, server="MaxPerDomainOutboundConnections = 20",
                tail=SMART_HOST.format(sink=peer.port)), port, commands=commands)
        else:
            context = postfix(root, relayhost=peer.port)
        with context as started:
            port = started if isinstance(started, int) else port
            begin = time.monotonic()
            smtp_source(port, messages, sessions, RECIPIENT, sender=sender)
            end = peer.wait_for(messages)
    return messages / (end - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=20)
    common_arguments(parser)
    args = parser.parse_args()
    require_tools(SMTP_SOURCE, SMTP_SINK, POSTFIX)
    results = collect(args, prepare_base("hubport-bench-relay-"), {
        "hubport": lambda root: relay_rate("hubport", root, args.messages, args.sessions),
        BASELINE: lambda root: relay_rate("postfix", root, args.messages, args.sessions)})
    emit(f"Relay SMTP in -> smtp-sink, {args.sessions} senders, 2 KB", "msg/s", results,
         as_json=args.json)


if __name__ == "__main__":
    main()
