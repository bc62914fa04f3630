"""``hubport shell``: cmdlet lines at a prompt, or from a script file, one per line.

At the prompt: history (kept in ``~/.hubport_history``) and tab completion of cmdlet names,
their parameters and the organization's nouns, through the standard library's readline.
A script (``hubport shell setup.ps1``) runs its lines in order, skips blank lines and
``#`` comments, and stops at the first line that fails, naming it (file:line).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["interactive", "run_script"]

PROMPT = "hubport> "
EXITS = ("exit", "quit", "logout")


def _lines(text: str) -> list[tuple[int, str]]:
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]


def run_script(path: Path, run_line: Callable[[str], int]) -> int:
    """Every line of the script; the first failure ends it with its status."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"hubport: cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
              file=sys.stderr)
        return 2
    for number, line in _lines(text):
        status = run_line(line)
        if status != 0:
            print(f"hubport: {path}:{number}: stopped here (status {status}): {line}",
                  file=sys.stderr)
            return status
    return 0


def completions(words: Sequence[str]) -> list[str]:
    """Tab completion: cmdlet names first; then the cmdlet's parameters; after a parameter
    that takes a fixed set of values, those values; after ``|``, the stages."""
    from hubport.core.cmdlet_help import catalogue, parameters_of

    names = [e.name for e in catalogue()]
    if not words or words[-1] == "|":
        return sorted(STAGES if words else names)
    if "|" in words:
        return []
    try:
        params = dict(parameters_of(words[0]))
    except Exception:  # not a cmdlet (yet): nothing to offer
        return []
    last = words[-1]
    if last.startswith("-"):
        wanted = last[1:].lower()
        named = [p for p in params if p.lower() == wanted] or \
            [p for p in params if p.lower().startswith(wanted)]
        if len(named) == 1 and params[named[0]]:
            return list(params[named[0]])
    return sorted([f"-{p}" for p in params] + ["|"])


STAGES = ["Format-List", "Format-Table", "Select-Object", "Where-Object", "Sort-Object",
          "ConvertTo-Json"]


def interactive(run_line: Callable[[str], int]) -> int:
    """The prompt: one line at a time until exit or end of input."""
    try:
        import readline
    except ImportError:  # pragma: no cover - readline is part of CPython on Linux
        readline = None  # type: ignore[assignment]
    history = Path.home() / ".hubport_history"
    if readline is not None:
        try:
            readline.read_history_file(history)
        except OSError:
            pass
        readline.parse_and_bind("tab: complete")
        readline.set_completer_delims(" \t")

        def complete(text: str, state: int) -> str | None:
            before = readline.get_line_buffer()[:readline.get_begidx()].split()
            options = [o for o in completions(before) if o.lower().startswith(text.lower())]
            return options[state] if state < len(options) else None

        readline.set_completer(complete)
    status = 0
    try:
        while True:
            try:
                line = input(PROMPT).strip()
            except EOFError:
                print()
                break
            except KeyboardInterrupt:
                print()
                continue
            if not line or line.startswith("#"):
                continue
            if line.lower() in EXITS:
                break
            status = run_line(line)
    finally:
        if readline is not None:
            try:
                readline.write_history_file(history)
            except OSError:
                pass
    return status
