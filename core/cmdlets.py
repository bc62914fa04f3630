"""Cmdlets typed as Exchange administrators type them: ``hubport 'Get-Queue -Server HUB01 |
fl'`` (core/cmdlet_line.py reads the line).

Each cmdlet declares its Exchange parameters and becomes the equivalent ``hubport``
command, so a cmdlet and the command behave the same in every respect (validation, output,
exit status). Exchange's defaults apply: ``Remove-Message`` tells the senders
(``-WithNDR $true``) unless told not to. ``| Format-List`` (``fl``), ``| Format-Table``
(``ft``) and ``| ConvertTo-Json`` choose the output; ``--json`` does the same for scripts.
``-WhatIf`` says what a changing cmdlet would do and does nothing; ``-Confirm:$false`` is
accepted (hubport never prompts).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hubport.core.cmdlet_line import (
    Bound,
    CmdletError,
    Parameter,
    bind,
    boolean,
    split_pipeline,
    text_list,
    tokenize,
)
from hubport.core.config_fields import suggest

__all__ = ["CMDLETS", "is_cmdlet_line", "to_argv"]

P = Parameter
_VERB_NOUN = re.compile(r"^\s*[A-Za-z]+-[A-Za-z]+(\s|$)")


@dataclass(frozen=True)
class Cmdlet:
    """A cmdlet: its parameters, the hubport command it runs, how the values map."""

    name: str
    command: str
    parameters: tuple[Parameter, ...]
    to_options: Callable[[Bound], list[str]]
    changes: bool = False  # -WhatIf applies
    formats: bool = True  # takes --format table|list|json
    help: str = ""


def _opt(flag: str, value: Any) -> list[str]:
    return [] if value in (None, "", []) else [flag, str(value)]


def _common(b: Bound) -> list[str]:
    return _opt("--server", b.values.get("Server"))


def _queue_options(b: Bound) -> list[str]:
    out = _common(b) + _opt("--identity", b.values.get("Identity"))
    out += _opt("--filter", b.values.get("Filter"))
    out += _opt("--queue", b.values.get("Queue"))
    size = b.values.get("ResultSize")
    out += _opt("--resultsize", None if size == "unlimited" else size)
    if b.values.get("Resubmit"):
        out.append("--resubmit")
    if b.values.get("WithNDR"):
        out.append("--with-ndr")
    out += _opt("--path", b.values.get("Path"))
    return out


def _result_size(text: str) -> str:
    if text.strip().lower() == "unlimited":
        return "unlimited"
    value = int(text)
    if value < 1:
        raise ValueError("expects a positive whole number or Unlimited")
    return str(value)


SERVER = P("Server")
IDENTITY = P("Identity", positional=True)
WHATIF = (P("WhatIf", switch=True, default=False), P("Confirm", switch=True, default=False))
FILTER = P("Filter")


def _queue_cmdlet(name: str, command: str, *extra: Parameter, changes: bool = False,
                  help: str = "") -> Cmdlet:
    params = (IDENTITY, SERVER, *extra, *(WHATIF if changes else ()))
    return Cmdlet(name, command, params, _queue_options, changes=changes, help=help)


def _tracking_options(b: Bound) -> list[str]:
    out = _common(b)
    for name in ("Start", "End", "EventId", "MessageId", "InternalMessageId",
                 "MessageSubject", "Sender", "Reference", "Source", "ResultSize"):
        out += _opt(f"-{name.lower()}", b.values.get(name))
    recipients = b.values.get("Recipients") or []
    if recipients:
        out += ["-recipients", *recipients]
    return out


def _route_options(b: Bound) -> list[str]:
    if not b.values.get("Recipient"):
        raise CmdletError("Test-Route: -Recipient is required (the address to route)")
    out = _common(b) + [str(b.values["Recipient"])]
    out += _opt("--sender", b.values.get("Sender"))
    out += _opt("--size", b.values.get("Size"))
    return out


CMDLETS: dict[str, Cmdlet] = {c.name.lower(): c for c in (
    _queue_cmdlet("Get-Queue", "get-queue", FILTER, help="list the queues (Get-Queue)"),
    _queue_cmdlet("Retry-Queue", "retry-queue",
                  P("Resubmit", lambda t: boolean(t, "Resubmit"), default=False),
                  changes=True, help="make a queue in Retry try now"),
    _queue_cmdlet("Suspend-Queue", "suspend-queue", changes=True, help="stop a queue"),
    _queue_cmdlet("Resume-Queue", "resume-queue", changes=True, help="resume a queue"),
    _queue_cmdlet("Get-Message", "get-message", P("Queue"), FILTER,
                  P("ResultSize", _result_size), help="list queued messages"),
    _queue_cmdlet("Suspend-Message", "suspend-message", changes=True, help="hold a message"),
    _queue_cmdlet("Resume-Message", "resume-message", changes=True,
                  help="release a held message"),
    _queue_cmdlet("Remove-Message", "remove-message",
                  P("WithNDR", lambda t: boolean(t, "WithNDR"), default=True),
                  changes=True, help="remove a queued message (an NDR unless -WithNDR $false)"),
    _queue_cmdlet("Export-Message", "export-message", P("Path"), changes=False,
                  help="write a suspended message as a Replay file"),
    Cmdlet("Get-MessageTrackingLog", "get-messagetrackinglog", (
        SERVER, P("Start"), P("End"), P("EventId"), P("MessageId"), P("InternalMessageId"),
        P("MessageSubject"), P("Sender"), P("Recipients", text_list), P("Reference"),
        P("Source"), P("ResultSize", _result_size)), _tracking_options,
        help="search the message tracking log"),
    Cmdlet("Test-Route", "test-route", (
        P("Recipient", positional=True), P("Sender"), P("Size"), SERVER), _route_options,
        formats=False, help="where a recipient goes from a server, and why"),
    Cmdlet("Get-TransportServer", "get-transportserver", (P("Identity", positional=True),),
           lambda b: _opt("--server", b.values.get("Identity")), formats=False,
           help="the transport servers (and what each runs from a store)"),
)}

#: output stages: Format-List, Format-Table, ConvertTo-Json (and the aliases)
OUTPUT = {"format-list": "list", "fl": "list", "format-table": "table", "ft": "table",
          "convertto-json": "json"}


#: Where-Object and its aliases: a filter the queue cmdlets apply on the server
WHERE = ("where-object", "where", "?")


def _where(cmdlet: Cmdlet, words: Sequence[Any], options: list[str]) -> list[str]:
    """``| Where-Object {$_.Status -eq 'Retry'}`` becomes the cmdlet's -Filter (``$_.``
    dropped), joined with -and to one already given."""
    if FILTER not in cmdlet.parameters:
        raise CmdletError(f"| Where-Object: hubport filters Get-Queue and Get-Message; for"
                          f" {cmdlet.name} name the object with -Identity")
    block = next((w.text for w in words[1:] if w.block), None)
    if block is None:
        raise CmdletError("| Where-Object needs a script block: Where-Object {$_.Status -eq"
                          " 'Retry'}")
    condition = re.sub(r"\$_\.", "", block).strip()
    if "--filter" in options:
        at = options.index("--filter") + 1
        options[at] = f"{options[at]} -and {condition}"
        return options
    return [*options, "--filter", condition]


def output_of(stages: Sequence[str], extra: Sequence[str]) -> str | None:
    """The output the stages after a cmdlet ask for (Format-List, Format-Table,
    ConvertTo-Json), or ``--json`` beside the line; None: the cmdlet's own."""
    output = "json" if "--json" in extra else None
    for stage in stages:
        words = tokenize(stage)
        verb = words[0].text.lower() if words else ""
        if verb not in OUTPUT:
            raise CmdletError(f"| {stage}: hubport takes Format-List (fl), Format-Table (ft)"
                              " or ConvertTo-Json after this cmdlet")
        output = OUTPUT[verb]
    return output


def is_cmdlet_line(text: str, commands: Sequence[str] = ()) -> bool:
    """Whether one command-line word is a cmdlet line: ``Verb-Noun`` with parameters or a
    pipeline, or a ``Verb-Noun`` that is no ``hubport`` command (Get-Help, a typo)."""
    if not _VERB_NOUN.match(text):
        return False
    word = text.strip()
    return " " in word or "|" in word or word.lower() not in commands


def to_argv(line: str, extra: Sequence[str] = ()) -> tuple[list[str], str]:
    """The ``hubport`` command line a cmdlet line stands for, and what -WhatIf would say
    instead ("" when it runs). ``extra`` are options given beside the line (--config,
    --json)."""
    stages = split_pipeline(line)
    tokens = tokenize(stages[0])
    if not tokens or tokens[0].parameter:
        raise CmdletError(f"{line!r}: a cmdlet name first (e.g. Get-Queue)")
    name = tokens[0].text
    cmdlet = CMDLETS.get(name.lower())
    if cmdlet is None:
        from hubport.core.shell import completions

        raise CmdletError(f"{name}: not a cmdlet hubport knows{suggest(name, completions([]))}"
                          f" (Get-Help lists them)")
    bound = bind(cmdlet.name, tokens[1:], cmdlet.parameters)
    options = cmdlet.to_options(bound)
    output = None
    for stage in stages[1:]:
        words = tokenize(stage)
        verb = words[0].text.lower() if words else ""
        if verb in WHERE:
            options = _where(cmdlet, words, options)
            continue
        if verb not in OUTPUT:
            raise CmdletError(f"| {stage}: hubport takes Where-Object, Format-List (fl),"
                              " Format-Table (ft) or ConvertTo-Json after a cmdlet")
        output = OUTPUT[verb]
    if "--json" in extra:
        output = "json"
    if output is not None:
        if not cmdlet.formats and output != "json":
            raise CmdletError(f"{cmdlet.name} prints its own report: only ConvertTo-Json or"
                              " --json changes it")
        options += ["--json"] if not cmdlet.formats else ["--format", output]
    argv = [cmdlet.command, *[e for e in extra if e != "--json"], *options]
    if cmdlet.changes and bound.values.get("WhatIf"):
        target = bound.values.get("Identity") or "(every match)"
        return argv, f'What if: {cmdlet.name} on "{target}".'
    return argv, ""


def help_text(name: str | None = None) -> str:
    """Get-Help: every cmdlet, or one with its parameters."""
    from hubport.core.org_cmdlets import NOUNS, SINGLE, noun_name

    if not name:
        lines = [f"{c.name:<24} {c.help}" for c in CMDLETS.values()]
        for noun, section in NOUNS.items():
            verbs = "Get-/Set-" if section in SINGLE else "New-/Set-/Get-/Remove-"
            lines.append(f"{verbs}{noun_name(noun):<{40 - len(verbs)}} [[{section}]] objects;"
                         " the parameters are their fields")
        return "\n".join(lines)
    _verb, _, noun = name.partition("-")
    if noun.lower() in NOUNS:
        section = NOUNS[noun.lower()]
        return (f"{name} -Identity <Name> [-<Field> <value> ...]\n    edits [[{section}]]"
                " objects; the fields and their values are those of the organization file"
                " (core/default.toml shows every one); $null clears a field")
    cmdlet = CMDLETS.get(name.lower())
    if cmdlet is None:
        known = [c.name for c in CMDLETS.values()]
        raise CmdletError(f"{name}: not a cmdlet hubport knows{suggest(name, known)}")
    params = " ".join(f"[-{p.name}{'' if p.switch else ' <value>'}]"
                      for p in cmdlet.parameters)
    return f"{cmdlet.name} {params}\n    {cmdlet.help}"

