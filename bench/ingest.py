"""Benchmark: folder ingestion end to end, with the real daemon in a subprocess.

1. Replay → Drop: N small Replay files (one FAX recipient) renamed into ``replay/``; timed
   until N files sit in the Foreign connector's drop folder.
2. Pickup → Maildir: N small Pickup files to one mailbox; timed until N files are in its
   Maildir.

Files are written in a staging folder on the same filesystem and renamed in (how a
well-behaved producer writes). Every stage is durable: the queue commits with fsync (group
commit), drop and Maildir files are synced before they are made visible.

    .venv/bin/python bench/ingest.py [--count 10000] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peers import cpu_seconds, wait_running
from report import common_arguments, emit

ORG = """
[[accepted_domain]]
Name = "contoso.test"
DomainName = "contoso.test"
Default = true

[[mailbox]]
Name = "Bob"
PrimarySmtpAddress = "bob@contoso.test"

[[transport_server]]
Name = "HUB01"
PickupDirectoryMaxMessagesPerMinute = "unlimited"
FolderRescanInterval = "1s"
FolderSettleTime = "0s"
MessageTrackingLogMaxDirectorySize = "10GB"

[[foreign_connector]]
Name = "Fax Gateway"
AddressSpaces = ["FAX:*"]
CreateDropDirectory = true
"""

QUIET = False  # --json: only the JSON line

BODY = ("This is a small test message body line for the ingestion benchmark.\n" * 25)


def replay_message(i: int) -> bytes:
    return (f"X-Sender: <alice@contoso.test>\nX-Receiver: <IMCEAFAX-+2B1555{i:07d}@contoso.test>\n"
            f"From: alice@contoso.test\nTo: fax@contoso.test\nSubject: bench {i}\n"
            f"Message-ID: <bench-r-{i}@contoso.test>\n\n{BODY}").encode()


def pickup_message(i: int) -> bytes:
    return (f"From: alice@contoso.test\nTo: bob@contoso.test\nSubject: bench {i}\n"
            f"Message-ID: <bench-p-{i}@contoso.test>\n\n{BODY}").encode()


def hubport() -> list[str]:
    script = Path(sys.executable).with_name("hubport")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hubport.core.cli"]


def count(folder: Path, pattern: str = "*") -> int:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    return sum(1 for n in names if not n.startswith(".") and n.endswith(pattern.lstrip("*")))


def run_case(root: Path, name: str, target: Path, make: callable, folder: Path, n: int,
             pattern: str = "*", pid: int = 0) -> float:
    stage = root / f"stage-{name}"
    stage.mkdir()
    for i in range(n):
        (stage / f"m{i:06d}.eml").write_bytes(make(i))
    cpu_before = cpu_seconds(pid)
    start = time.monotonic()
    for i in range(n):
        os.rename(stage / f"m{i:06d}.eml", folder / f"m{i:06d}.eml")
    renamed = time.monotonic() - start
    while count(target, pattern) < n:
        if time.monotonic() - start > 600:
            raise SystemExit(f"{name}: only {count(target, pattern)} of {n} arrived in 600 s")
        time.sleep(0.1)
    elapsed = time.monotonic() - start
    rate = n / elapsed
    cpu = cpu_seconds(pid) - cpu_before
    if not QUIET:
        print(f"{name:<18} {n:>6} files in {elapsed:6.2f} s = {rate:7.0f} files/s"
              f"  (daemon CPU {cpu:.1f} s = {cpu / n * 1000:.2f} ms/file;"
              f" renaming in took {renamed:.2f} s)")
    return rate


def raw_loop(root: Path, n: int) -> float:
    """The floor to compare ingestion with: read, parse (the Replay reader) and delete the
    same files in one loop, in this process, with no queue, commit or delivery."""
    from hubport.core.folder_formats import parse_replay

    stage = root / "stage-raw"
    stage.mkdir()
    for i in range(n):
        (stage / f"m{i:06d}.eml").write_bytes(replay_message(i))
    start = time.monotonic()
    for entry in os.scandir(stage):
        with open(entry.path, "rb") as f:
            parse_replay(f.read(), default_domain="contoso.test", server_name="HUB01")
        os.unlink(entry.path)
    rate = n / (time.monotonic() - start)
    if not QUIET:
        print(f"{'raw read+parse+delete':<18} {n:>6} files = {rate:7.0f} files/s")
    return rate


def stop_daemon(proc: subprocess.Popen[bytes], log: object, root: Path, keep: bool,
                sig: int = signal.SIGTERM) -> None:
    """Stop the daemon (drain), close its log, and remove the bench folder unless kept."""
    proc.send_signal(sig)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()  # type: ignore[attr-defined]
    if keep:
        print("kept", root)
    else:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    common_arguments(parser, runs=1)
    args = parser.parse_args()
    global QUIET
    QUIET = args.json
    results: dict[str, list[float]] = {}
    for _ in range(args.runs):
        for case, rate in one_run(args.count, args.keep).items():
            results.setdefault(case, []).append(rate)
    emit(f"Folder ingestion, {args.count} files per case (durable end to end)", "files/s",
         results, as_json=args.json)


def one_run(count_: int, keep: bool) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="hubport-bench-"))
    (root / "org.toml").write_text(ORG)
    log = open(root / "daemon.log", "wb")
    command = [*hubport(), "run", "--config", str(root / "org.toml")]
    if os.environ.get("HUBPORT_BENCH_PROFILE"):  # e.g. "py-spy record -o prof.svg --"
        command = [*os.environ["HUBPORT_BENCH_PROFILE"].split(), *command]
    proc = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_running(root / "daemon.log", proc)
        except RuntimeError as exc:
            raise SystemExit(str(exc)) from None
        if not QUIET:
            print(f"hubport ingestion benchmark, {os.cpu_count()} CPUs, {count_} files per case")
        return {
            "Replay -> Drop": run_case(root, "replay -> drop", root / "drop" / "Fax Gateway",
                                       replay_message, root / "replay", count_, ".eml",
                                       proc.pid),
            "Pickup -> Maildir": run_case(root, "pickup -> Maildir",
                                          root / "var" / "mailboxes" / "Bob" / "new",
                                          pickup_message, root / "pickup", count_,
                                          pid=proc.pid),
            "raw read + parse + delete loop": raw_loop(root, count_),
        }
    finally:
        profiling = os.environ.get("HUBPORT_BENCH_PROFILE")
        stop_daemon(proc, log, root, keep, signal.SIGINT if profiling else signal.SIGTERM)


if __name__ == "__main__":
    main()
