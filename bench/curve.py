"""Benchmark: the cost curve of the receive path, by concurrency and by message size.

hubport's 250 after its durable commit (the Submission queue suspended, so only receiving
is measured) against Postfix's smtpd + cleanup (fsync of the queue file before the 250,
then discard), in the same run, with the same load: Postfix's ``smtp-source`` at 1, 5, 20
and 100 concurrent sessions with 1 KB messages, and at 20 sessions with 1 KB, 100 KB and
10 MB messages. Prints messages/s and MB/s, and with ``--plot FILE`` draws both curves
(matplotlib, from the ``bench`` extra).

    .venv/bin/python bench/curve.py [--runs 1] [--plot curve.png] [--json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from peers import (
    POSTFIX,
    SMTP_SOURCE,
    bench_org,
    free_port,
    hubport,
    hubport_command,
    postfix,
    prepare_base,
    require_tools,
    smtp_source,
)
from report import BASELINE, common_arguments, emit

#: room for the 10 MB point
LARGE = '[transport_config]\nMaxReceiveSize = "64MB"\nMaxSendSize = "64MB"\n'
LARGE_CONNECTOR = 'MaxInboundConnection = "unlimited"\nMaxMessageSize = "64MB"'
RECIPIENT = "alice@contoso.test"
KB = 1024
#: (sessions, message size, messages per point); the size points run at 20 sessions
CONCURRENCY = [(1, KB, 1000), (5, KB, 2000), (20, KB, 3000), (100, KB, 3000)]
SIZES = [(20, KB, 3000), (20, 100 * KB, 1000), (20, 10 * KB * KB, 40)]


def point(base: Path, sessions: int, size: int, messages: int) -> dict[str, float]:
    """Messages per second for hubport (receive path) and for Postfix at one point."""
    port = free_port()
    root = base / "hubport"
    with hubport(root, bench_org(port, connector=LARGE_CONNECTOR, tail=LARGE), port):
        hubport_command(root, "suspend-queue", "--identity", "HUB01\\Submission")
        hub = messages / smtp_source(port, messages, sessions, RECIPIENT, size=size)
    with postfix(base / "postfix") as pf_port:
        pf = messages / smtp_source(pf_port, messages, sessions, RECIPIENT, size=size)
    return {"hubport": hub, BASELINE: pf}


def label(sessions: int, size: int) -> str:
    shown = f"{size // (KB * KB)} MB" if size >= KB * KB else f"{size // KB} KB"
    return f"{sessions} sessions, {shown}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the messages")
    parser.add_argument("--plot", type=Path, help="draw the curves into this PNG")
    common_arguments(parser, runs=1)
    args = parser.parse_args()
    require_tools(SMTP_SOURCE, POSTFIX)
    base = prepare_base("hubport-bench-curve-")
    points = list(dict.fromkeys(CONCURRENCY + SIZES))
    results: dict[str, list[float]] = {}
    try:
        for _ in range(args.runs):
            for sessions, size, messages in points:
                count = max(10, messages // 10) if args.quick else messages
                for server, rate in point(base, sessions, size, count).items():
                    results.setdefault(f"{label(sessions, size)}: {server}", []).append(rate)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    if args.plot:
        plot(args.plot, results)
    if args.json:
        print(json.dumps({"benchmark": "Receive path cost curve", "unit": "msg/s",
                          "runs": results}))
        return
    emit("Receive path cost curve (the 250 after the durable commit)", "msg/s", results,
         as_json=False)
    for sessions, size, _ in points:
        key = label(sessions, size)
        hub = statistics.median(results[f"{key}: hubport"])
        pf = statistics.median(results[f"{key}: {BASELINE}"])
        print(f"  {key:24} hubport {hub * size / KB / KB:7.1f} MB/s  Postfix "
              f"{pf * size / KB / KB:7.1f} MB/s  ratio {hub / pf:5.2f}")


def plot(path: Path, results: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_sessions, by_size) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server, style in (("hubport", "o-"), (BASELINE, "s--")):
        xs = [s for s, _, _ in CONCURRENCY]
        ys = [statistics.median(results[f"{label(s, z)}: {server}"]) for s, z, _ in CONCURRENCY]
        by_sessions.plot(xs, ys, style, label=server)
        sizes = [z / KB for _, z, _ in SIZES]
        mbs = [statistics.median(results[f"{label(s, z)}: {server}"]) * z / KB / KB
               for s, z, _ in SIZES]
        by_size.plot(sizes, mbs, style, label=server)
    by_sessions.set(xscale="log", xlabel="concurrent sessions (1 KB messages)",
                    ylabel="messages/s", title="Throughput by concurrency")
    by_size.set(xscale="log", xlabel="message size, KB (20 sessions)", ylabel="MB/s",
                title="Throughput by message size")
    for axes in (by_sessions, by_size):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    figure.suptitle("Receive path: the 250 after a durable commit, hubport vs Postfix")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
