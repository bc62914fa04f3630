"""Benchmark: how one hubport server scales with its worker processes.

Runs one server with ``--workers 1``, then with ``--workers 2`` (``--workers``), its Submission
queue suspended (the receive path: the 250 after the durable commit), and loads it with
``smtp-source`` (the same messages and sessions each time). It prints the rate, the ratio to
one worker, and the CPU-seconds per message of the server's processes (the supervisor and
its workers). On a 2-core machine the load generator shares the cores with the server.

    .venv/bin/python bench/scaling.py [--messages 6000] [--sessions 20] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from peers import (
    SMTP_SOURCE,
    bench_org,
    cpu_seconds,
    free_port,
    hubport,
    hubport_command,
    prepare_base,
    require_tools,
    smtp_source,
)
from report import common_arguments, emit


def measure(base: Path, workers: int, messages: int, sessions: int) -> tuple[float, float]:
    """(messages per second, server CPU milliseconds per message)."""
    port = free_port()
    root = base / f"w{workers}"
    with hubport(root, bench_org(port), port, workers=workers) as daemon:
        hubport_command(root, "suspend-queue", "--identity", "HUB01\\Submission")
        cpu_before = cpu_seconds(daemon.pid)
        started = time.monotonic()
        smtp_source(port, messages, sessions, "alice@contoso.test")
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(daemon.pid) - cpu_before
    return messages / elapsed, cpu / messages * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    common_arguments(parser)
    args = parser.parse_args()
    require_tools(SMTP_SOURCE)
    base = prepare_base("hubport-bench-scaling-")
    results: dict[str, list[float]] = {}
    try:
        for _ in range(args.runs):
            rates = {}
            for n in args.workers:
                rate, cost = measure(base, n, args.messages, args.sessions)
                rates[n] = rate
                results.setdefault(f"{n} worker(s): msg/s", []).append(rate)
                results.setdefault(f"{n} worker(s): CPU ms per message", []).append(cost)
            first = args.workers[0]
            for n in args.workers[1:]:
                results.setdefault(f"{n} workers / {first}", []).append(rates[n] / rates[first])
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    emit(f"Receive path, one server by worker count, {args.sessions} sessions, 2 KB",
         "msg/s, ratio and CPU ms/message", results, as_json=args.json)


if __name__ == "__main__":
    main()
