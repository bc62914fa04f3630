"""Benchmark: how the receive path scales with processes, before hubport has workers.

Runs 1, then 2 (``--processes``) independent hubport daemons, each with its own state folder
and port and its Submission queue suspended (the receive path: the 250 after the durable
commit), and loads them at once with one ``smtp-source`` each, splitting the messages and
sessions evenly. The total rate over the slowest finisher is the ceiling a worker design
(one pipeline per process) can reach on this machine; the daemons' CPU-seconds per message
show what one message costs.

    .venv/bin/python bench/scaling.py [--messages 6000] [--sessions 20] [--processes 1 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from peers import (
    SMTP_SOURCE,
    bench_org,
    free_port,
    hubport,
    hubport_command,
    prepare_base,
    require_tools,
    smtp_source,
)
from report import common_arguments, emit


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(base: Path, processes: int, messages: int, sessions: int) -> tuple[float, float]:
    """(messages per second in all, daemon CPU milliseconds per message)."""
    share, per_sessions = messages // processes, max(1, sessions // processes)
    with ExitStack() as stack:
        ports, pids = [], []
        for index in range(processes):
            port = free_port()
            root = base / f"hub{index}"
            daemon = stack.enter_context(hubport(root, bench_org(port), port))
            hubport_command(root, "suspend-queue", "--identity", "HUB01\\Submission")
            ports.append(port)
            pids.append(daemon.pid)
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        started = time.monotonic()
        with ThreadPoolExecutor(processes) as pool:
            list(pool.map(lambda port: smtp_source(port, share, per_sessions,
                                                   "alice@contoso.test"), ports))
        elapsed = time.monotonic() - started
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
    return share * processes / elapsed, cpu / (share * processes) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    common_arguments(parser)
    args = parser.parse_args()
    require_tools(SMTP_SOURCE)
    base = prepare_base("hubport-bench-scaling-")
    results: dict[str, list[float]] = {}
    try:
        for _ in range(args.runs):
            for n in args.processes:
                rate, cost = measure(base / f"p{n}", n, args.messages, args.sessions)
                results.setdefault(f"{n} process(es): msg/s", []).append(rate)
                results.setdefault(f"{n} process(es): CPU ms per message", []).append(cost)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    emit(f"Receive path with independent daemons, {args.sessions} sessions in all, 2 KB",
         "msg/s and CPU ms/message", results, as_json=args.json)


if __name__ == "__main__":
    main()
