"""Every benchmark in one command, each against Postfix doing the same work in the same run.

Runs each benchmark script in its own process with ``--json`` and prints one table:
median, min–max and the ratio to Postfix's median, plus the machine it ran on. Not part of
the test command (it takes minutes and wants an idle machine); needs Debian's ``postfix``
package for ``smtp-source``, ``smtp-sink`` and the private Postfix instances.

    .venv/bin/python bench/run_all.py [--runs 3] [--quick] [--json FILE] [--plot FILE]
           [--large SIZE]

``--quick`` runs small counts (a smoke test of the benchmarks, not figures to publish).
``--large 1G`` also runs ``large_message.py`` once with a message of that size (the daemon's
memory while it passes each way in and out); it writes several GB, so it is not run unless
asked.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from report import table

HERE = Path(__file__).resolve().parent

#: script, its arguments for a full run, for a quick one
BENCHMARKS = [
    ("smtp_accept.py", ["--messages", "6000", "--sessions", "20"],
     ["--messages", "600", "--sessions", "10"]),
    ("accept_maildir.py", ["--messages", "4000", "--sessions", "20"],
     ["--messages", "400", "--sessions", "10"]),
    ("relay.py", ["--messages", "5000", "--sessions", "20"],
     ["--messages", "500", "--sessions", "10"]),
    ("dkim_relay.py", ["--messages", "3000", "--sessions", "20"],
     ["--messages", "300", "--sessions", "10"]),
    ("ingest.py", ["--count", "10000"], ["--count", "500"]),
    ("latency.py", ["--messages", "200"], ["--messages", "30"]),
    ("curve.py", [], ["--quick"]),
    # one run: 100,000 messages take minutes, and memory varies little between runs
    ("scaling.py", ["--messages", "6000"], ["--messages", "600"]),
    ("memory.py", ["--messages", "100000", "--runs", "1"], ["--messages", "2000", "--runs", "1"]),
]


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in
                     Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    memory = ""
    try:
        kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text()
                      .splitlines() if line.startswith("MemTotal")))
        memory = f", {kb / 1024 / 1024:.1f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return (f"{os.cpu_count()} CPUs ({model}){memory}, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    parser.add_argument("--plot", type=Path, help="draw the cost curve into this PNG "
                        "(needs matplotlib: pip install -e .[bench])")
    parser.add_argument("--large", metavar="SIZE", help="also pass one message of SIZE "
                        "(64M, 1G ...) through each way in and out: bench/large_message.py")
    args = parser.parse_args()
    started = time.monotonic()
    reports = []
    benchmarks = list(BENCHMARKS)
    if args.large:  # one run: minutes of I/O per gigabyte, and memory hardly varies
        large = ["--size", args.large, "--runs", "1"]
        benchmarks.append(("large_message.py", large, large))
    for script, full, quick in benchmarks:
        # a later --runs (memory.py's own) wins over the common one
        command = [sys.executable, str(HERE / script), "--json", "--runs", str(args.runs),
                   *(quick if args.quick else full)]
        if script == "curve.py" and args.plot:
            command += ["--plot", str(args.plot.resolve())]
        print(f"running {script} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=HERE)
        if done.returncode != 0:
            raise SystemExit(f"{script} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        reports.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"hubport benchmarks, {time.strftime('%Y-%m-%d')}, {machine()}")
    print(f"{args.runs} runs each{' (quick counts)' if args.quick else ''},"
          f" {time.monotonic() - started:.0f} s in all\n")
    for report in reports:  # a report with a table of its own (large_message.py) prints it
        print((report.get("table") or table(report["benchmark"], report["unit"],
                                            report["runs"])) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "reports": reports}, indent=2))


if __name__ == "__main__":
    main()
