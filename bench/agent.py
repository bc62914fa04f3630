"""Benchmark: messages per second through a no-op delivery agent (the pipeline's overhead).

N Replay files addressed to a Delivery Agent connector whose agent does nothing but
acknowledge (it appends one line per batch to a counter file, so the benchmark sees the
progress). Timed from renaming the files into ``replay/`` until N items are acknowledged:
what remains is hubport's own cost: ingestion, queue commits, routing, the delivery-agent
runner and the result commits. The real daemon runs in a subprocess.

    .venv/bin/python bench/agent.py [--count 5000] [--keep]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ingest import hubport, stop_daemon
from peers import cpu_seconds, wait_running

ORG = """
[hubport]
Plugins = ["noop_agent"]

[[accepted_domain]]
Name = "contoso.test"
DomainName = "contoso.test"
Default = true

[[transport_server]]
Name = "HUB01"
PickupDirectoryMaxMessagesPerMinute = "unlimited"
FolderRescanInterval = "1s"
FolderSettleTime = "0s"
MessageTrackingLogMaxDirectorySize = "10GB"

[[delivery_agent_connector]]
Name = "Null"
AddressSpaces = ["SMTP:null.test;1"]
DeliveryProtocol = "NOOP"
"""

AGENT = '''
import os
from hubport.core.api import DeliveryAgent, ItemResult, hookimpl

COUNTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "delivered.count")

class NoopAgent(DeliveryAgent):
    async def deliver_many(self, items):
        with open(COUNTER, "a") as fh:
            fh.write(f"{len(items)}\\n")
        return [ItemResult.success(item) for item in items]

@hookimpl
def register_delivery_agents(register):
    register("NOOP", NoopAgent)
'''

BODY = "A small message body line for the delivery-agent benchmark.\n" * 25


def replay_message(i: int) -> bytes:
    return (f"X-Sender: <alice@contoso.test>\nX-Receiver: <user{i}@null.test>\n"
            f"From: alice@contoso.test\nTo: user{i}@null.test\nSubject: bench {i}\n"
            f"Message-ID: <bench-a-{i}@contoso.test>\n\n{BODY}").encode()


def delivered(root: Path) -> int:
    try:
        return sum(int(line) for line in (root / "delivered.count").read_text().split())
    except (FileNotFoundError, ValueError):
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5_000)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hubport-bench-agent-"))
    (root / "org.toml").write_text(ORG)
    (root / "noop_agent.py").write_text(AGENT)
    log = open(root / "daemon.log", "wb")
    proc = subprocess.Popen([*hubport(), "run", "--config", str(root / "org.toml")], cwd=root,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_running(root / "daemon.log", proc)
        except RuntimeError as exc:
            raise SystemExit(str(exc)) from None
        stage = root / "stage"
        stage.mkdir()
        for i in range(args.count):
            (stage / f"m{i:06d}.eml").write_bytes(replay_message(i))
        cpu_before = cpu_seconds(proc.pid)
        start = time.monotonic()
        for i in range(args.count):
            os.rename(stage / f"m{i:06d}.eml", root / "replay" / f"m{i:06d}.eml")
        while delivered(root) < args.count:
            if time.monotonic() - start > 600 or proc.poll() is not None:
                raise SystemExit(f"only {delivered(root)} of {args.count} delivered")
            time.sleep(0.05)
        elapsed = time.monotonic() - start
        cpu = cpu_seconds(proc.pid) - cpu_before
        print(f"hubport delivery-agent benchmark, {os.cpu_count()} CPUs")
        print(f"replay -> no-op agent {args.count:>6} messages in {elapsed:6.2f} s"
              f" = {args.count / elapsed:7.0f} messages/s"
              f"  (daemon CPU {cpu:.1f} s = {cpu / args.count * 1000:.2f} ms/message)")
    finally:
        stop_daemon(proc, log, root, args.keep)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
