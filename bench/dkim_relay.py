"""Benchmark: the relay with DKIM signing on, against the same relay without it and Postfix.

The load of bench/relay.py (``smtp-source``, 20 reused sessions, 2 KB messages to one
external recipient, through a Send connector to ``smtp-sink``), sent from
``sender@contoso.test``. Three servers in one run: hubport without signing, hubport with
``New-DkimSigningConfig -DomainName contoso.test -Enabled $true`` (rsa-sha256, 2048-bit,
relaxed/relaxed, every message signed as it leaves), and Postfix relaying the same load
unsigned, the baseline of every hubport figure. The line to read is signed / unsigned:
the cost of signing, which should stay within 20 %.

    .venv/bin/python bench/dkim_relay.py [--messages 3000] [--sessions 20] [--runs 3]
"""

from __future__ import annotations

import argparse

from peers import POSTFIX, SMTP_SINK, SMTP_SOURCE, prepare_base, require_tools
from relay import relay_rate
from report import BASELINE, collect, common_arguments, emit

SENDER = "sender@contoso.test"
SIGNING = ("New-DkimSigningConfig -DomainName contoso.test -Enabled $true",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=20)
    common_arguments(parser)
    args = parser.parse_args()
    require_tools(SMTP_SOURCE, SMTP_SINK, POSTFIX)
    results = collect(args, prepare_base("hubport-bench-dkim-"), {
        "hubport": lambda root: relay_rate("hubport", root, args.messages, args.sessions,
                                           sender=SENDER),
        "hubport signing": lambda root: relay_rate("hubport", root, args.messages,
                                                   args.sessions, sender=SENDER,
                                                   commands=SIGNING),
        BASELINE: lambda root: relay_rate("postfix", root, args.messages, args.sessions,
                                          sender=SENDER)})
    emit(f"Relay SMTP in -> smtp-sink with and without DKIM signing, {args.sessions}"
         " senders, 2 KB", "msg/s", results, as_json=args.json)


if __name__ == "__main__":
    main()
