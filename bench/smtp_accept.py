"""Benchmark: SMTP messages accepted per second with a durable commit, hubport vs Postfix.

The load is Postfix's ``smtp-source`` (20 sessions that reuse their connections, one 2 KB
message per transaction, one recipient), the same for both servers, in the same run:

* hubport: the real daemon in a subprocess with one receive connector on a loopback port.
  The 250 after DATA comes after the queue's group commit (SQLite WAL, synchronous=FULL).
  Measured twice: with the Submission queue suspended (the receive path alone: what a
  client waits for) and with the whole pipeline running (categorizer and Maildir delivery
  competing for the same two cores).
* Postfix: a private instance (its own config and queue folder under the bench folder; the
  system's Postfix is not touched) whose smtpd hands each message to cleanup, which fsyncs
  the queue file before smtpd answers 250; the messages are then discarded.

Each figure is the median of ``--runs`` runs. Needs Debian's ``postfix`` package (for
``smtp-source`` and the Postfix daemons), installed by ``./dev test``.

    .venv/bin/python bench/smtp_accept.py [--messages 6000] [--sessions 20] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMTP_SOURCE = "/usr/sbin/smtp-source"
POSTFIX = "/usr/sbin/postfix"
CHECKOUT = Path(__file__).resolve().parents[1]

ORG = """
[[accepted_domain]]
Name = "contoso.test"
DomainName = "contoso.test"
Default = true

[[mailbox]]
Name = "Alice"

[[transport_server]]
Name = "HUB01"
MessageTrackingLogMaxDirectorySize = "10GB"
ReceiveProtocolLogPath = ""

[[receive_connector]]
Name = "Default HUB01"
Bindings = ["127.0.0.1:{port}"]
PermissionGroups = ["AnonymousUsers"]
MaxInboundConnectionPerSource = "unlimited"
"""

POSTFIX_MAIN = """
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = bench.test
mydestination =
relay_domains = contoso.test
mynetworks = 127.0.0.0/8
default_transport = discard:bench
relay_transport = discard:bench
maillog_file = /dev/stdout
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_process_limit = 100
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def load(port: int, messages: int, sessions: int) -> float:
    """Run smtp-source; the wall time in seconds."""
    started = time.monotonic()
    done = subprocess.run(
        [SMTP_SOURCE, "-d", "-s", str(sessions), "-m", str(messages), "-l", "2048",
         "-f", "sender@example.org", "-t", "alice@contoso.test", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=600, check=False)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {done.stderr.strip()[-500:]}")
    return elapsed


def hubport_rate(root: Path, messages: int, sessions: int, *, paused: bool
                 ) -> tuple[float, int]:
    """Messages per second, and the messages found afterwards (queued or delivered)."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    port = free_port()
    (root / "org.toml").write_text(ORG.format(port=port))
    hubport = str(CHECKOUT / ".venv" / "bin" / "hubport")
    log = open(root.parent / f"{root.name}.log", "wb")  # outside the watched config folder
    daemon = subprocess.Popen([hubport, "run", "--config", "org.toml"], cwd=root,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port)
        if paused:
            subprocess.run([hubport, "suspend-queue", "--identity", "HUB01\\Submission",
                            "--config", "org.toml"], cwd=root, check=True,
                           capture_output=True)
        elapsed = load(port, messages, sessions)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        log.close()
    with sqlite3.connect(root / "var" / "queue" / "mail.que") as db:
        queued = db.execute("SELECT COUNT(*) FROM message").fetchone()[0]
    mailbox = root / "var" / "mailboxes" / "Alice" / "new"
    delivered = len(list(mailbox.iterdir())) if mailbox.is_dir() else 0
    return messages / elapsed, queued + delivered


def postfix_rate(root: Path, messages: int, sessions: int) -> float:
    shutil.rmtree(root, ignore_errors=True)
    (root / "conf").mkdir(parents=True)
    (root / "queue").mkdir()
    (root / "data").mkdir()
    shutil.chown(root / "data", "postfix")
    port = free_port()
    master = Path("/usr/share/postfix/master.cf.dist").read_text()
    master = master.replace("smtp      inet  n       -       y       -       -       smtpd",
                            f"127.0.0.1:{port} inet n - n - - smtpd")
    (root / "conf" / "master.cf").write_text(master)
    (root / "conf" / "main.cf").write_text(POSTFIX_MAIN.format(root=root))
    log = open(root.parent / "postfix.log", "wb")
    server = subprocess.Popen([POSTFIX, "-c", str(root / "conf"), "start-fg"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(port)
        elapsed = load(port, messages, sessions)
    finally:
        subprocess.run([POSTFIX, "-c", str(root / "conf"), "stop"], capture_output=True,
                       check=False)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    return messages / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the bench folder")
    args = parser.parse_args()
    for tool in (SMTP_SOURCE, POSTFIX):
        if not Path(tool).exists():
            sys.exit(f"{tool} is missing: apt-get install postfix (see ./dev)")
    base = Path(tempfile.mkdtemp(prefix="hubport-bench-smtp-"))
    base.chmod(0o755)  # Postfix's daemons run as the postfix user and must reach their folders
    cases = {"hubport (receive path)": True, "hubport + categorizer + Maildir": False}
    results: dict[str, list[float]] = {name: [] for name in [*cases, "postfix"]}
    try:
        for run in range(args.runs):
            for index, (name, paused) in enumerate(cases.items()):
                rate, found = hubport_rate(base / f"hubport{index}", args.messages,
                                           args.sessions, paused=paused)
                assert found == args.messages, f"{name}: {found} found of {args.messages}"
                results[name].append(rate)
            results["postfix"].append(postfix_rate(base / "postfix", args.messages,
                                                   args.sessions))
            print(f"run {run + 1}: " + "  ".join(f"{name} {values[-1]:.0f}/s"
                                                 for name, values in results.items()),
                  flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in results.items()}
    postfix = medians.pop("postfix")
    print(f"\nSMTP accept, {args.sessions} sessions, 2 KB messages, {args.messages} per run,"
          f" median of {args.runs} (hubport alone: Submission suspended, the receive path"
          " with its durable commit):")
    for name, rate in medians.items():
        print(f"  {name:34} {rate:8.0f} msg/s   ratio to Postfix {rate / postfix:5.2f}")
    print(f"  {'Postfix (smtpd + cleanup fsync)':34} {postfix:8.0f} msg/s")


if __name__ == "__main__":
    main()
