"""How every benchmark reports: medians with min–max and the ratio to Postfix, or JSON.

Each benchmark collects ``{case: [one figure per run]}`` and hands it to ``emit``; with
``--json`` it prints one JSON object instead of the table, which ``bench/run_all.py``
gathers into one table for the whole suite.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path

#: the case every ratio is taken against, when a benchmark has it
BASELINE = "Postfix"


def common_arguments(parser: argparse.ArgumentParser, runs: int = 3) -> None:
    """``--runs``, ``--keep`` and ``--json``, the same for every benchmark."""
    parser.add_argument("--runs", type=int, default=runs, help="runs; medians are printed")
    parser.add_argument("--keep", action="store_true", help="keep the bench folder")
    parser.add_argument("--json", action="store_true", help="print the runs as JSON")


def collect(args: argparse.Namespace, base: Path,
            cases: Mapping[str, Callable[[Path], float]]) -> dict[str, list[float]]:
    """Measure every case ``args.runs`` times, in turn, each in its own folder under
    ``base``; a line per run unless ``--json``; ``base`` is removed unless ``--keep``."""
    results: dict[str, list[float]] = {case: [] for case in cases}
    try:
        for run in range(args.runs):
            for index, (case, measure) in enumerate(cases.items()):
                results[case].append(measure(base / f"case{index}"))
            if not args.json:
                print(f"run {run + 1}: " + "  ".join(f"{case} {values[-1]:.0f}/s"
                                                     for case, values in results.items()),
                      flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return results


def rows(runs: dict[str, list[float]]) -> list[tuple[str, float, float, float, float | None]]:
    """(case, median, min, max, ratio of the median to the baseline's median or None).

    The baseline of ``"<point>: hubport"`` is ``"<point>: Postfix"`` (a curve's points);
    of a plain case, ``"Postfix"``."""
    out = []
    for case, values in runs.items():
        point, sep, server = case.rpartition(": ")
        base_key = f"{point}{sep}{BASELINE}" if sep else BASELINE
        base = statistics.median(runs[base_key]) if runs.get(base_key) else None
        median = statistics.median(values)
        ratio = median / base if base and (server if sep else case) != BASELINE else None
        out.append((case, median, min(values), max(values), ratio))
    return out


def table(title: str, unit: str, runs: dict[str, list[float]]) -> str:
    count = max(len(v) for v in runs.values())
    lines = [f"{title} (median of {count}, min–max, {unit})"]
    for case, median, low, high, ratio in rows(runs):
        shown = f"  ratio {ratio:5.2f}" if ratio is not None else ""
        places = 0 if median >= 100 else 2  # small figures (ms per message) keep their digits
        lines.append(f"  {case:44} {median:9.{places}f}  ({low:.{places}f}–{high:.{places}f})"
                     f"{shown}")
    return "\n".join(lines)


def emit(title: str, unit: str, runs: dict[str, list[float]], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"benchmark": title, "unit": unit, "runs": runs}))
    else:
        print("\n" + table(title, unit, runs))
