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
from dataclasses import dataclass, field
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
from hubport.core.cmdlet_output import Stages, read_stages, where_condition
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
    #: the objects of the command's JSON output under Exchange's property names, for the
    #: object stages (Where-Object, Select-Object, ...); None: it prints a report
    view: Callable[[Any], list[dict[str, Any]]] | None = None


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


def _rows(output: Any) -> list[dict[str, Any]]:
    return output if isinstance(output, list) else [output]


def _queues(output: Any) -> list[dict[str, Any]]:
    from hubport.core.queue_view import queue_properties

    return [queue_properties(r) for r in _rows(output)]


def _messages(output: Any) -> list[dict[str, Any]]:
    from hubport.core.queue_view import message_properties

    return [message_properties(r) for r in _rows(output)]


def _events(output: Any) -> list[dict[str, Any]]:
    from hubport.core.tracking import event_properties

    return [event_properties(r) for r in _rows(output)]


def _servers(output: Any) -> list[dict[str, Any]]:
    return [{"Name": r["name"], "Site": r["site"], "Fqdn": r["fqdn"],
             "Generation": r["generation"], "Revision": r["revision"], "Current": r["current"]}
            for r in _rows(output)]


def _queue_cmdlet(name: str, command: str, *extra: Parameter, changes: bool = False,
                  help: str = "") -> Cmdlet:
    params = (IDENTITY, SERVER, *extra, *((FILTER, *WHATIF) if changes else ()))
    view = None if name in ("Remove-Message", "Export-Message") else \
        _queues if name.endswith("Queue") else _messages
    return Cmdlet(name, command, params, _queue_options, changes=changes, help=help,
                  view=view)


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
        help="search the message tracking log", view=_events),
    Cmdlet("Test-Route", "test-route", (
        P("Recipient", positional=True), P("Sender"), P("Size"), SERVER), _route_options,
        formats=False, help="where a recipient goes from a server, and why"),
    Cmdlet("Get-TransportServer", "get-transportserver", (P("Identity", positional=True),),
           lambda b: _opt("--server", b.values.get("Identity")), formats=False,
           help="the transport servers (and what each runs from a store)", view=_servers),
)}

def _server_filter(cmdlet: Cmdlet, stages: list[str], options: list[str]) -> list[str]:
    """A first ``| Where-Object {$_.Status -eq 'Retry'}`` after Get-Queue or Get-Message
    becomes their -Filter, applied by the daemon (joined with -and to one already given);
    the stages left work on the objects printed."""
    condition = where_condition(stages[0]) if stages and FILTER in cmdlet.parameters \
        else None
    if condition is None:
        return options
    stages.pop(0)
    if "--filter" in options:
        at = options.index("--filter") + 1
        options[at] = f"{options[at]} -and {condition}"
        return options
    return [*options, "--filter", condition]


def _stage_cmdlet(stage: str) -> str:
    words = stage.split()
    return words[0].lower() if words else ""


def _for_each_match(cmdlet: Cmdlet, bound: Bound, stages: Sequence[str],
                    extra: Sequence[str]) -> Invocation:
    """An action cmdlet given -Filter instead of -Identity, as Exchange takes it: the
    Get- cmdlet with that filter, then the action on each match."""
    if bound.values.get("Identity"):
        raise CmdletError(f"{cmdlet.name}: give -Identity or -Filter, not both")
    getter = "Get-Queue" if cmdlet.name.endswith("-Queue") else "Get-Message"
    server = bound.values.get("Server")
    source = to_argv(f"{getter} -Filter {{{bound.values['Filter']}}}"
                     + (f" -Server '{server}'" if server else ""),
                     [*(e for e in extra if e != "--json"), "--json"])
    words = [cmdlet.name]
    for name in sorted(bound.given - {"Filter", "Identity"}):
        value = bound.values[name]
        text = ("$true" if value else "$false") if isinstance(value, bool) else f"'{value}'"
        words.append(f"-{name}:{text}")
    source.then, source.extra = " | ".join([" ".join(words), *stages]), list(extra)
    return source


def is_cmdlet_line(text: str, commands: Sequence[str] = ()) -> bool:
    """Whether one command-line word is a cmdlet line: ``Verb-Noun`` with parameters or a
    pipeline, or a ``Verb-Noun`` that is no ``hubport`` command (Get-Help, a typo)."""
    if not _VERB_NOUN.match(text):
        return False
    word = text.strip()
    return " " in word or "|" in word or word.lower() not in commands


@dataclass
class Invocation:
    """What a cmdlet line runs: the ``hubport`` command line, what -WhatIf says instead
    ("" when it runs), and the object stages to apply to the command's JSON output."""

    argv: list[str]
    what_if: str = ""
    post: Stages | None = None
    cmdlet: Cmdlet | None = None
    line: str = ""  # the cmdlet line, for the admin audit log
    #: a cmdlet line to run once for each object the command returns, with its identity
    #: (``Get-Message -Queue X | Suspend-Message``, ``Retry-Queue -Filter {...}``)
    then: str = ""
    then_parameter: str = "Identity"
    extra: list[str] = field(default_factory=list)  # the options beside the line


def to_argv(line: str, extra: Sequence[str] = ()) -> Invocation:
    """The ``hubport`` command a cmdlet line stands for. ``extra`` are options given beside
    the line (--config, --json)."""
    stages = split_pipeline(line)
    action = next((i for i, stage in enumerate(stages[1:], 1)
                   if _stage_cmdlet(stage) in CMDLETS), None)
    if action is not None:  # Get-Queue ... | Retry-Queue: the action once per object
        source = to_argv(" | ".join(stages[:action]),
                         [*(e for e in extra if e != "--json"), "--json"])
        if source.cmdlet is None or source.cmdlet.view is None:
            raise CmdletError(f"| {stages[action].strip()}: {stages[0].split()[0]} returns no"
                              " objects to pass on")
        source.then, source.extra = " | ".join(stages[action:]), list(extra)
        taker = CMDLETS[_stage_cmdlet(stages[action])]
        source.then_parameter = "Queue" if taker.name == "Get-Message" else "Identity"
        return source
    tokens = tokenize(stages[0])
    if not tokens or tokens[0].parameter:
        raise CmdletError(f"{line!r}: a cmdlet name first (e.g. Get-Queue)")
    name = tokens[0].text
    cmdlet = CMDLETS.get(name.lower())
    if cmdlet is None:
        from hubport.core.cmdlet_help import catalogue

        known = [e.name for e in catalogue()]
        raise CmdletError(f"{name}: not a cmdlet hubport knows{suggest(name, known)}"
                          f" (Get-Help lists them)")
    bound = bind(cmdlet.name, tokens[1:], cmdlet.parameters)
    if bound.values.get("Filter") and cmdlet.changes:  # Retry-Queue -Filter {...}
        return _for_each_match(cmdlet, bound, stages[1:], extra)
    rest = stages[1:]
    options = _server_filter(cmdlet, rest, cmdlet.to_options(bound))
    post = read_stages(rest, extra)
    if post.works_on_objects and cmdlet.view is None:
        raise CmdletError(f"{cmdlet.name} prints a report, not objects: only ConvertTo-Json"
                          " or --json changes it")
    output = "json" if post.works_on_objects else post.output
    if output is not None:
        if not cmdlet.formats and output != "json":
            raise CmdletError(f"{cmdlet.name} prints its own report: only ConvertTo-Json or"
                              " --json changes it")
        options += ["--json"] if not cmdlet.formats or output == "json" else \
            ["--format", output]
    argv = [cmdlet.command, *[e for e in extra if e != "--json"], *options]
    if cmdlet.changes and bound.values.get("WhatIf"):
        target = bound.values.get("Identity") or "(every match)"
        return Invocation(argv, f'What if: {cmdlet.name} on "{target}".')
    return Invocation(argv, post=post if post.works_on_objects else None, cmdlet=cmdlet)
