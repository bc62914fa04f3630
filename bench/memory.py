"""Benchmark: the daemon's memory with a long queue for a next hop that is down.

``--messages`` 2 KB messages (default 100,000) arrive over SMTP for a domain whose Send
connector's smart host refuses connections, so every message stays queued (the queue in
Retry). The server's resident set (VmRSS, summed over the supervisor and its workers) is
read at each tenth of the load and its peak (VmHWM, each process's own peak summed) at the
end: memory should follow the queue's index, not the messages.

    .venv/bin/python bench/memory.py [--messages 100000] [--json]
"""

from __future__ import annotations

import argparse
import shutil

from peers import (
    SMTP_SOURCE,
    bench_org,
    free_port,
    hubport,
    memory_kib,
    prepare_base,
    queued_messages,
    require_tools,
    smtp_source,
)
from report import common_arguments, emit

DOWN = """
[[send_connector]]
Name = "Down"
AddressSpaces = ["SMTP:fabrikam.example;1"]
SmartHosts = ["[127.0.0.1]"]
Port = {down}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    common_arguments(parser, runs=1)
    args = parser.parse_args()
    require_tools(SMTP_SOURCE)
    base = prepare_base("hubport-bench-memory-")
    results: dict[str, list[float]] = {}
    try:
        for _ in range(args.runs):
            port, down = free_port(), free_port()  # nothing listens on ``down``
            root = base / "hubport"
            with hubport(root, bench_org(port, relay=True, tail=DOWN.format(down=down)),
                         port) as daemon:
                start = memory_kib(daemon.pid)["VmRSS"] / 1024
                results.setdefault("RSS at start", []).append(start)
                step = max(1, args.messages // 10)
                sent = 0
                while sent < args.messages:
                    smtp_source(port, step, 20, "someone@fabrikam.example")
                    sent += step
                    if sent in (step, args.messages // 2, args.messages):
                        results.setdefault(f"RSS with {sent:,} queued", []).append(
                            memory_kib(daemon.pid)["VmRSS"] / 1024)
                results.setdefault("peak RSS (VmHWM)", []).append(
                    memory_kib(daemon.pid)["VmHWM"] / 1024)
            queued = queued_messages(root)
            if queued < args.messages:
                raise SystemExit(f"only {queued} of {args.messages} messages were queued")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    emit(f"Memory with {args.messages:,} messages queued for a next hop that is down",
         "MiB", results, as_json=args.json)


if __name__ == "__main__":
    main()
