"""The ``hubport`` command: run the daemon, inspect plugins, queues and the tracking log.

Management commands take Exchange's cmdlet names and parameter names, case-insensitively:
``hubport Get-MessageTrackingLog -EventId FAIL -Sender alice@contoso.test``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from hubport.core import __version__


def config_argument(text: str) -> Path:
    """``--config``: a file, or an organization store's URL (etcd://host:2379/contoso)."""
    from hubport.core.org_store import StoreUrl, is_store_url

    return StoreUrl(text) if is_store_url(text) else Path(text)  # type: ignore[return-value]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-config", type=config_argument, default=None,
                        help="organization TOML file, or etcd://host:2379[,host:port]/prefix"
                             " (docs/deployment.md; default: the embedded default)")
    parser.add_argument("--server", "-server", default=None,
                        help="the transport server this command acts for (default: the first;"
                             " '*' for get-queue and get-message: every server)")


def _parser() -> argparse.ArgumentParser:
    from hubport.core.cmdlet_help import catalogue

    cmdlets = [e.name for e in catalogue()]
    width = max(len(n) for n in cmdlets) + 2
    columns = [cmdlets[i:i + 3] for i in range(0, len(cmdlets), 3)]
    parser = argparse.ArgumentParser(
        prog="hubport", description="hubport: an Exchange-style mail transport hub",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
            "cmdlets (one quoted line: hubport 'Get-Queue | Format-List'; hubport shell for a"
            " prompt;\nGet-Help <cmdlet> for its parameters and examples):\n"
            + "\n".join("  " + "".join(n.ljust(width) for n in row).rstrip()
                        for row in columns)
            + "\n\nThe lower-case commands above are the older spellings, kept as aliases so"
              " scripts keep working:\n  get-queue --format json      = Get-Queue |"
              " ConvertTo-Json\n  retry-queue X --resubmit     = Retry-Queue X -Resubmit"
              " $true\n  remove-message X --with-ndr  = Remove-Message X (the cmdlet sends"
              " the NDR unless -WithNDR $false;\n                                 the alias"
              " sends none unless --with-ndr)\n  get-messagetrackinglog -sender A ="
              " Get-MessageTrackingLog -Sender A"))
    parser.add_argument("--version", action="version", version=f"hubport {__version__}")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the transport daemon")
    _common(run)
    run.add_argument("--json-logs", action="store_true", default=None,
                     help="log JSON lines even on a terminal")
    run.add_argument("--workers", type=_positive, default=None, metavar="N",
                     help="worker processes, each a full pipeline with its own queue"
                          " (default: the number of CPUs; 1 runs a single process)")
    # set by the supervisor on each worker's command line
    run.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    run.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--restarted", action="store_true", help=argparse.SUPPRESS)

    plugins = sub.add_parser("plugins", help="list plugins, their hooks and the call order")
    _common(plugins)
    plugins.add_argument("--json", action="store_true")

    check = sub.add_parser("test-config", help="validate the organization file and exit")
    _common(check)

    push = sub.add_parser("push-organization",
                          help="validate an organization file and put it in force in the"
                               " store --config names (etcd://...), all at once")
    _common(push)
    push.add_argument("file", type=Path, help="the organization TOML file")
    pull = sub.add_parser("pull-organization",
                          help="print the organization in force in the store --config names,"
                               " as TOML that push-organization takes back unchanged")
    _common(pull)
    edit = sub.add_parser("set-object",
                          help="set one object of the organization in a store (a TOML table"
                               " from --file or standard input), validated, as one change")
    _common(edit)
    edit.add_argument("section", help="e.g. mailbox, send_connector, transport_config")
    edit.add_argument("name", nargs="?", default="", help="the object's Name")
    edit.add_argument("--file", type=Path, default=None, help="the table (default: stdin)")
    remove = sub.add_parser("remove-object",
                            help="remove one object of the organization in a store, validated")
    _common(remove)
    remove.add_argument("section")
    remove.add_argument("name")
    secrets = sub.add_parser("export-secrets",
                             help="copy the server-local secret files a new hub needs (its"
                                  " connectors' password files, the mailbox password hashes,"
                                  " the DKIM signing keys)"
                                  " into a folder, with a MANIFEST of where each goes")
    _common(secrets)
    secrets.add_argument("target", help="the transport server that needs them")
    secrets.add_argument("--out", type=Path, required=True)
    shell = sub.add_parser("shell", help="cmdlet lines at a prompt (history, tab completion),"
                                         " or from a script file, one per line")
    _common(shell)
    shell.add_argument("script", nargs="?", type=Path, default=None,
                       help="a file of cmdlet lines (# comments); it stops at the first"
                            " failing line")
    servers = sub.add_parser("get-transportserver",
                             help="the transport servers and, for a store, the generation and"
                                  " revision of the organization each one runs")
    _common(servers)
    servers.add_argument("--json", action="store_true")

    track = sub.add_parser("get-messagetrackinglog",
                           help="search the message tracking log (Get-MessageTrackingLog)")
    _common(track)
    for name in ("start", "end"):
        track.add_argument(f"-{name}", dest=name, type=_date_argument)
    for name in ("eventid", "messageid", "internalmessageid", "messagesubject", "sender",
                 "reference", "source"):
        track.add_argument(f"-{name}", dest=name)
    track.add_argument("-recipients", dest="recipients", nargs="+", default=[])
    track.add_argument("-resultsize", dest="resultsize", default="1000")
    track.add_argument("--format", "-format", dest="format", default="table",
                       choices=["table", "list", "json"],
                       help="json: one event per line (JSON Lines)")
    track.add_argument("--json", action="store_true",
                       help="the events as one JSON array (the cmdlet's ConvertTo-Json)")
    _certificate_option(track)

    _add_queue_commands(sub)

    pressure = sub.add_parser(
        "get-backpressure", help="the running daemon's back pressure: each watched resource,"
                                 " its level and thresholds, and the recent level changes")
    _common(pressure)
    pressure.add_argument("--format", "-format", default="table",
                          choices=["table", "list", "json"])

    route = sub.add_parser(
        "test-route", help="explain where a recipient goes from this server and why:"
                           " the categorizer's result, the candidates, the rule that chose")
    _common(route)
    route.add_argument("recipient", metavar="RECIPIENT", help="an address, e.g. bob@contoso.com")
    route.add_argument("--sender", "-sender", default="", help="the envelope sender")
    route.add_argument("--size", "-size", type=_size, default=0,
                       help="the message size (bytes, or 10MB, 1.5GB)")
    route.add_argument("--json", action="store_true", help="the report as JSON")

    # certificates from the organization's CA on this machine (core/internal_tls.py)
    for command, purpose, metavar, what, files in (
            ("new-servercertificate", "a transport server's internal transport certificate,"
             " for a hub on another machine", "SERVER", "the transport server's Name",
             "<fqdn>.crt, <fqdn>.key and ca.crt (default: ./<SERVER>-certificate)"),
            ("new-admincertificate", "an administrator's certificate for the hubs'"
             " management endpoints (ManagementBindings)", "NAME", "the administrator's name",
             "NAME.pem and ca.crt (default: ./NAME-admin)")):
        issue = sub.add_parser(command, help=f"issue {purpose}, from the organization's CA"
                                             " on this machine")
        _common(issue)
        issue.add_argument("identity", metavar=metavar, help=what)
        issue.add_argument("--out", "-out", type=Path, default=None, help=f"folder for {files}")

    passwd = sub.add_parser("set-password",
                            help="set a mailbox's password for SMTP authentication")
    _common(passwd)
    passwd.add_argument("mailbox", metavar="MAILBOX", help="alias, name or SMTP address")
    passwd.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of standard input")
    _COMMANDS[:] = list(sub.choices)
    return parser


#: the date forms Exchange's cmdlet pages print (month first, as en-US shells read them)
_DATE_FORMS = ("%m/%d/%Y %H:%M:%S", "%m/%d/%Y %H:%M", "%m/%d/%Y %I:%M:%S %p",
               "%m/%d/%Y %I:%M %p", "%m/%d/%Y")


def _when(text: str) -> datetime:
    """A time as ISO 8601 (``2026-12-07T09:00``) or as ``MM/dd/yyyy [HH:mm:ss]``; without
    a zone, UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        for form in _DATE_FORMS:
            try:
                value = datetime.strptime(text.strip(), form)
                break
            except ValueError:
                continue
        else:
            raise ValueError(f"{text!r} is not a date: write 2026-12-07T09:00:00 or"
                             " 12/07/2026 09:00:00 (month first)") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _date_argument(text: str) -> datetime:
    try:
        return _when(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _normalize_argv(argv: Sequence[str]) -> list[str]:
    """Cmdlet names and ``-Parameter`` names are case-insensitive, as in Exchange."""
    out = []
    for index, arg in enumerate(argv):
        if index == 0 and not arg.startswith("-"):
            out.append(arg.lower())
        elif arg.startswith("-") and not arg.startswith("--") and arg[1:].isalpha():
            out.append(arg.lower())
        else:
            out.append(arg)
    return out


#: the subcommands of ``hubport`` (filled by ``_parser``)
_COMMANDS: list[str] = []


def _audit_queue_cmdlet(args: argparse.Namespace, cmdlet: str, line: str) -> None:
    """A changing queue cmdlet that succeeded, in the admin audit log."""
    from hubport.core import admin_audit

    identity = getattr(args, "identity", None)
    try:
        admin_audit.record(args.config, admin_audit.entry(
            cmdlet, line, [str(identity)] if identity else [], "",
            admin_audit.caller(getattr(args, "certificate", None))))
    except Exception as exc:  # the change is made: say the record failed, do not hide it
        print(f"hubport: warning: the admin audit log could not record it: {exc}",
              file=sys.stderr)


def _config_of(options: Sequence[str]) -> Any:
    """``--config`` among the words beside a cmdlet line; else ./hubport.toml if there is
    one; else None (the embedded default)."""
    from hubport.core.org_cmdlets import LOCAL_FILE

    for flag in ("--config", "-config"):
        if flag in options and options.index(flag) + 1 < len(options):
            return config_argument(options[options.index(flag) + 1])
    return LOCAL_FILE if LOCAL_FILE.exists() else None


def _search_audit(line: str, extra: Sequence[str]) -> int | None:
    """Search-AdminAuditLog -Cmdlets -StartDate -EndDate -ObjectIds -ResultSize."""
    from hubport.core import admin_audit
    from hubport.core.cmdlet_line import Parameter, bind, split_pipeline, text_list, tokenize
    from hubport.core.cmdlet_output import apply, read_stages, render

    stages = split_pipeline(line)
    tokens = tokenize(stages[0])
    if not tokens or tokens[0].text.lower() != "search-adminauditlog":
        return None
    bound = bind("Search-AdminAuditLog", tokens[1:], (
        Parameter("Cmdlets", text_list, default=[]), Parameter("StartDate", _when),
        Parameter("EndDate", _when), Parameter("ObjectIds", text_list, default=[]),
        Parameter("ResultSize", int, default=1000)))
    config = _config_of(extra)
    v = bound.values
    rows = admin_audit.search(config, cmdlets=v["Cmdlets"], start=v["StartDate"],
                              end=v["EndDate"], object_ids=v["ObjectIds"],
                              limit=v["ResultSize"])
    stages_after = read_stages(stages[1:], extra)
    if stages_after.output == "json" and not stages_after.works_on_objects:
        print(json.dumps(rows, indent=2))
        return 0
    objects = apply([admin_audit.properties(row) for row in rows], stages_after)
    if stages_after.output is None and not stages_after.works_on_objects:
        for row in objects:
            print(f"{row['RunDate'][:19]}  {row['Caller']:<16} {row['CmdletLine']}")
        return 0
    print(render(objects, stages_after.output or "table", stages_after.columns), end="")
    return 0


def _organization_cmdlet(line: str, extra: Sequence[str]) -> int | None:
    """New-/Set-/Get-/Remove- of an organization object (core/org_cmdlets.py), else None."""
    from hubport.core import admin_audit, org_cmdlets
    from hubport.core.cmdlet_line import split_pipeline, tokenize
    from hubport.core.config_fields import ConfigError

    stages = split_pipeline(line)
    tokens = tokenize(stages[0])
    verb, _, noun = tokens[0].text.partition("-") if tokens else ("", "", "")
    known = noun.lower() in org_cmdlets.NOUNS or noun.lower() in (
        org_cmdlets.MEMBER_NOUN, org_cmdlets.PERMISSION_NOUN)
    if verb.lower() not in org_cmdlets.VERBS or not known:
        return None
    from hubport.core.cmdlet_output import read_stages

    options = list(extra)
    config = _config_of(options)
    output = read_stages(stages[1:], options)
    validate = org_cmdlets.validator(config)

    certificate = next((Path(options[i + 1]) for i, o in enumerate(options[:-1])
                        if o in ("--certificate", "-certificate")), None)

    def changed(cmdlet: str, where: Any, objects: list[str], revision: str) -> None:
        admin_audit.record(where, admin_audit.entry(cmdlet, line, objects, revision,
                                                    admin_audit.caller(certificate)))

    try:
        return org_cmdlets.run(verb.lower(), noun, tokens[1:], config, output, validate,
                               changed)
    except ConfigError as exc:
        print(f"hubport: change refused, nothing was written:\n{exc}", file=sys.stderr)
        return 2


def _command_names() -> list[str]:
    if not _COMMANDS:
        _parser()
    return list(_COMMANDS)


def _cmdlet(words: Sequence[str]) -> Any:
    """A cmdlet line among the words (``hubport 'Get-Queue -Server HUB01 | fl'``): the
    command it stands for (an Invocation), or an exit status when it ran here (the
    organization's cmdlets, Get-Help), is -WhatIf or is wrong."""
    from hubport.core.cmdlet_help import get_command, get_help
    from hubport.core.cmdlet_line import CmdletError
    from hubport.core.cmdlets import Invocation, is_cmdlet_line, to_argv

    commands = _command_names()
    index = 0  # the command word: after the options given before it (--config X, --json)
    while index < len(words) and words[index].startswith("-"):
        index += 1 if words[index] in ("--json", "-json") or "=" in words[index] else 2
    if index >= len(words) or not is_cmdlet_line(words[index], commands):
        return Invocation(list(words))
    line, extra = words[index], [*words[:index], *words[index + 1:]]
    try:
        found = _search_audit(line, extra)
        if found is None:
            found = _organization_cmdlet(line, extra)
        if found is not None:
            return found
        first = line.split()[0].lower() if line.split() else ""
        if first in ("get-help", "get-command", "help"):
            print(get_command(line) if first == "get-command" else get_help(line))
            return 0
        invocation = to_argv(line, extra)
    except CmdletError as exc:
        print(f"hubport: {exc}", file=sys.stderr)
        return 2
    if invocation.what_if:
        print(invocation.what_if)
        return 0
    invocation.line = line
    return invocation


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        if argv is not None:
            raise
        # the reader of our output went away (| head): stop quietly, as a Unix tool does;
        # stdout is pointed at /dev/null so the interpreter's final flush fails no more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
    invocation = _cmdlet(sys.argv[1:] if argv is None else argv)
    if isinstance(invocation, int):
        return invocation
    args = _parser().parse_args(_normalize_argv(invocation.argv))
    from hubport.core.org_cmdlets import LOCAL_FILE

    if getattr(args, "config", None) is None and "config" in args and LOCAL_FILE.exists():
        args.config = LOCAL_FILE.resolve()  # written by the first organization cmdlet
    from hubport.core.logsetup import configure

    configure(args.log_level, json=getattr(args, "json_logs", None))
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": _run, "plugins": _plugins, "test-config": _test_config,
        "get-messagetrackinglog": _tracking, "get-queue": _queue,
        "set-password": _set_password, "get-backpressure": _backpressure,
        "new-servercertificate": _new_server_certificate, "test-route": _test_route,
        "new-admincertificate": _new_admin_certificate,
        "push-organization": _push_organization, "pull-organization": _pull_organization,
        "get-transportserver": _get_transport_server,
        "set-object": _set_object, "remove-object": _set_object,
        "export-secrets": _export_secrets, "shell": _shell,
    }
    commands.update(dict.fromkeys(_QUEUE_ARGS, _queue))
    if args.command is None:
        _parser().print_help()
        return 2
    if invocation.then:
        return _for_each(invocation, lambda: commands[args.command](args))
    if invocation.post is None:
        status = commands[args.command](args)
    else:
        status = _with_stages(invocation, lambda: commands[args.command](args))
    if status == 0 and invocation.cmdlet is not None and invocation.cmdlet.changes:
        _audit_queue_cmdlet(args, invocation.cmdlet.name, invocation.line)
    return status


def _json_output(command: Callable[[], int]) -> tuple[int, Any]:
    """Run a command that prints one JSON document (its cmdlet's --json); its status and
    the document. A failure's output is passed on as it was printed."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = command()
    text = printed.getvalue()
    if status != 0:
        sys.stdout.write(text)
        return status, None
    return 0, json.loads(text) if text.strip() else []


def _for_each(invocation: Any, command: Callable[[], int]) -> int:
    """``Get-Message ... | Suspend-Message``: the action's line once for each object the
    command returned, with that object's identity; the first failure ends it."""
    status, objects = _json_output(lambda: _with_stages(invocation, command)
                                   if invocation.post is not None else command())
    if status != 0:
        return status
    as_json = "--json" in invocation.extra
    results: list[Any] = []
    for item in objects if isinstance(objects, list) else [objects]:
        identity = next((v for k, v in item.items() if k.lower() == "identity"), None) \
            if isinstance(item, dict) else None
        if identity is None:
            continue
        action, _, after = invocation.then.partition("|")
        if str(identity).lower().endswith("\\poison") and \
                action.split()[0].lower().endswith("-queue"):
            print(f"hubport: {identity} skipped: the Poison queue is always suspended; act on"
                  " its messages one by one (Resume-Message, Remove-Message)", file=sys.stderr)
            continue
        line = f"{action.strip()} -{invocation.then_parameter} '{identity}'" + (
            f" | {after}" if after else "")
        if not as_json:
            status = main([line, *invocation.extra])
        else:  # one JSON document for the whole line
            status, result = _json_output(partial(main, [line, *invocation.extra]))
            results.extend(result if isinstance(result, list) else [result])
        if status != 0:
            return status
    if as_json:
        print(json.dumps(results, indent=2))
    return 0


def _with_stages(invocation: Any, command: Callable[[], int]) -> int:
    """Run a command that prints JSON, then the stages after its cmdlet (Where-Object,
    Select-Object, ...) on the objects (core/cmdlet_output.py)."""
    from hubport.core.cmdlet_line import CmdletError
    from hubport.core.cmdlet_output import apply, render

    status, output = _json_output(command)
    if status != 0:
        return status
    post, view = invocation.post, invocation.cmdlet.view
    try:
        objects = apply(view(output), post)
        print(render(objects, post.output or "table", post.columns), end="")
    except CmdletError as exc:
        print(f"hubport: {exc}", file=sys.stderr)
        return 2
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _run(args: argparse.Namespace) -> int:
    from hubport.core import daemon, supervisor
    from hubport.core.workers import default_count, parse_slot

    if args.worker is not None:
        # until the worker installs its own handler: a reload asked of a starting server
        # must not end it (SIGHUP's default action)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if args.ready_fd is not None:
            os.set_inheritable(args.ready_fd, False)  # not passed on to its own children
        return daemon.run(args.config, args.server, worker=parse_slot(args.worker),
                          restarted=args.restarted, ready_fd=args.ready_fd)
    workers = args.workers or default_count()
    if workers == 1:
        return daemon.run(args.config, args.server)
    return supervisor.run(args.config, args.server, workers,
                          log_args=("--log-level", args.log_level),
                          run_args=("--json-logs",) if args.json_logs else ())


def _load(args: argparse.Namespace) -> Any:
    from hubport.core.daemon import StartupError, load, make_hooks, pick_server

    try:
        hooks = make_hooks(args.config)
        org = load(args.config, hooks, args.server)
        server = org.server(pick_server(org, args.server))
    except StartupError as exc:
        print(f"hubport: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    return hooks, org, server


def _plugins(args: argparse.Namespace) -> int:
    hooks, _, _ = _load(args)
    description = hooks.describe()[0]
    if args.json:
        print(json.dumps(description, indent=2))
        return 0
    print("Plugins (discovery order):")
    for p in description["plugins"]:
        print(f"  {p['name']:<16} {p['version']:<10} {p['module']}")
        print(f"  {'':<16} hooks: {', '.join(p['hooks']) or '-'}")
    print("\nHook call order (first called first):")
    for hook, names in description["call_order"].items():
        print(f"  {hook:<28} {' -> '.join(names)}")
    print("\nConnector types:", ", ".join(sorted(hooks.registry.connector_types)) or "-")
    print("Delivery agents:", ", ".join(sorted(hooks.registry.delivery_agents)) or "-")
    return 0


def _test_config(args: argparse.Namespace) -> int:
    _, org, server = _load(args)
    print(f"{org.source}: valid. Server {server.name} in site {server.site}; "
          f"{len(org.accepted_domains)} accepted domains, {len(org.mailboxes)} mailboxes, "
          f"{len(org.connectors)} connectors.")
    for connector in org.connectors:
        summary = getattr(connector, "summary", None)
        print("  " + (summary() if summary is not None
                      else f'{getattr(connector, "kind", "Connector")} "{connector.name}"'))
    for warning in org.config_warnings:
        print(f"{org.source}: warning: {warning}", file=sys.stderr)
    return 0


def _store(args: argparse.Namespace) -> Any:
    from hubport.core.org_store import OrganizationStore, StoreError, is_store_url

    if not is_store_url(args.config):
        print("hubport: --config must name an organization store (etcd://host:2379/prefix)",
              file=sys.stderr)
        raise SystemExit(2)
    try:
        return OrganizationStore.from_url(str(args.config))
    except StoreError as exc:
        print(f"hubport: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _push_organization(args: argparse.Namespace) -> int:
    """Validate as test-config does, then write the file as the store's new generation."""
    import asyncio

    from hubport.core.daemon import StartupError, load, make_hooks
    from hubport.core.org_store import StoreError

    store = _store(args)
    try:
        hooks = make_hooks(args.file)
        org = load(args.file, hooks)
    except StartupError as exc:
        print(f"hubport: {exc}", file=sys.stderr)
        return exc.exit_code
    text = args.file.read_text(encoding="utf-8-sig")
    try:
        generation = asyncio.run(store.push(text))
    except StoreError as exc:
        print(f"hubport: {exc}", file=sys.stderr)
        return 1
    print(f"{store.url}: generation {generation} in force ({len(org.servers)} servers,"
          f" {len(org.connectors)} connectors)")
    return 0


def _set_object(args: argparse.Namespace) -> int:
    """One object set or removed in the organization in force (a compare-and-swap over
    everything its validation read, retried on top of a concurrent change)."""
    import asyncio
    import tomllib

    from hubport.core.config import parse_organization
    from hubport.core.config_fields import ConfigError
    from hubport.core.daemon import make_hooks
    from hubport.core.org_store import StoreError

    store = _store(args)
    table = None
    if args.command == "set-object":
        source = args.file.read_text(encoding="utf-8") if args.file else sys.stdin.read()
        try:
            table = tomllib.loads(source)
        except tomllib.TOMLDecodeError as exc:
            print(f"hubport: {args.file or '<stdin>'}: not a TOML table: {exc}", file=sys.stderr)
            return 2
    hooks = make_hooks(None)

    def validate(text: str) -> None:
        parse_organization(text, source=f"{store.url} (with this change)", base_dir=Path.cwd(),
                           connector_types=hooks.registry.connector_types,
                           delivery_agents=hooks.registry.delivery_agents)

    try:
        generation = asyncio.run(store.change({(args.section, args.name): table}, validate))
    except ConfigError as exc:
        print(f"hubport: change refused:\n{exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"hubport: {exc}", file=sys.stderr)
        return 1
    what = "removed" if table is None else "set"
    print(f"{store.url}: {args.section} {args.name!r} {what} (generation {generation})")
    return 0


def _named_server(org: Any, name: str) -> Any:
    """The transport server ``name``; None after saying there is none."""
    try:
        return org.server(name)
    except KeyError as exc:
        print(f"hubport: {exc.args[0]}", file=sys.stderr)
        return None


def _shell(args: argparse.Namespace) -> int:
    from hubport.core import shell

    config = ["--config", str(args.config)] if args.config is not None else []
    server = ["--server", args.server] if args.server else []

    def run_line(line: str) -> int:
        try:
            return main([line, *config, *server])
        except SystemExit as exc:  # argparse's own refusal of a line
            return exc.code if isinstance(exc.code, int) else 2

    if args.script is not None:
        return shell.run_script(args.script, run_line)
    return shell.interactive(run_line)


def _export_secrets(args: argparse.Namespace) -> int:
    from hubport.core.secrets_export import export_secrets

    _, org, here = _load(args)
    target = _named_server(org, args.target)
    if target is None:
        return 2
    written, missing = export_secrets(org, target, here, args.out)
    for path in missing:
        print(f"hubport: warning: {path} is not on this machine; the new hub needs it too",
              file=sys.stderr)
    print(f"{len(written)} secret files for {target.name} in {args.out} (MANIFEST says where"
          " each goes; copy them with mode 0600, owned by the hub's user)")
    return 0


def _pull_organization(args: argparse.Namespace) -> int:
    import asyncio

    from hubport.core.org_store import StoreError

    store = _store(args)
    try:
        text, _generation, _revision = asyncio.run(store.read())
    except StoreError as exc:
        print(f"hubport: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


def _get_transport_server(args: argparse.Namespace) -> int:
    """Get-TransportServer: each server, and for a store what it runs (converged or not)."""
    import asyncio

    from hubport.core.org_store import StoreError, is_store_url

    _, org, _server = _load(args)
    running: dict[str, dict[str, Any]] = {}
    current = None
    if is_store_url(args.config):
        store = _store(args)
        try:
            running = asyncio.run(store.hubs())
            current, _ = asyncio.run(store.current())
        except StoreError as exc:
            print(f"hubport: {exc}", file=sys.stderr)
            return 1
    rows = [{"name": s.name, "site": s.site, "fqdn": s.fqdn,
             "generation": running.get(s.name, {}).get("generation"),
             "revision": running.get(s.name, {}).get("revision"),
             "current": (running.get(s.name, {}).get("generation") == current)
             if current else None} for s in org.servers]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'Name':<12} {'Site':<20} {'Generation':<10} {'Revision':<9} Fqdn")
    for r in rows:
        mark = "  (behind)" if r["generation"] and r["current"] is False else ""
        print(f"{r['name']:<12} {r['site']:<20} {r['generation'] or '-':<10}"
              f" {r['revision'] or '-':<9} {r['fqdn']}{mark}")
    return 0


def _tracking(args: argparse.Namespace) -> int:
    from hubport.core.control import ControlError
    from hubport.core.tracking import format_events, search

    _, org, server = _load(args)
    size = None if str(args.resultsize).lower() == "unlimited" else int(args.resultsize)
    filters = {"event_id": args.eventid, "message_id": args.messageid,
               "internal_message_id": args.internalmessageid,
               "message_subject": args.messagesubject, "sender": args.sender,
               "reference": args.reference, "source": args.source}
    if args.certificate is None:  # the log files of this machine
        events = search(server.message_tracking_log_path, start=args.start, end=args.end,
                        recipients=args.recipients, result_size=size, **filters)
    else:  # the server's own search, on its management endpoint
        request = {k: v for k, v in filters.items() if v is not None}
        request.update(recipients=args.recipients, result_size=size,
                       start=args.start.isoformat() if args.start else None,
                       end=args.end.isoformat() if args.end else None)
        try:
            events = _remote(args, org, server, "get-messagetrackinglog", request)
        except ControlError as exc:
            print(f"hubport: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(events, indent=2))
    else:
        print(format_events(events, args.format))
    return 0


def _remote(args: argparse.Namespace, org: Any, server: Any, op: str,
            request: dict[str, Any]) -> Any:
    """One request to ``server``'s management endpoint with ``--certificate``."""
    from hubport.core.control import ControlError
    from hubport.core.management import admin_files, call_remote
    from hubport.core.tls import TlsConfigError

    try:
        certificate, authority = admin_files(args.certificate, org, server)
    except TlsConfigError as exc:
        raise ControlError(str(exc)) from None
    return call_remote(server, certificate, authority, op, request)


def _queue(args: argparse.Namespace) -> int:
    """Get-Queue and the other queue cmdlets: a request to the running daemon."""
    from hubport.core.control import ControlError, call
    from hubport.core.queue_admin import write_export
    from hubport.core.queue_view import queue_list, queue_table

    every = args.server == "*" and args.command in ("get-queue", "get-message")
    if every:
        args.server = None
    _, org, server = _load(args)
    op = args.command
    request = {name: value for name, value in vars(args).items()
               if name in _QUEUE_ARGS.get(op, ()) and value not in (None, False)}
    if op == "export-message":
        request.pop("path", None)

    def ask(target: Any) -> Any:
        if args.certificate is not None and (target.management_bindings or not every):
            return _remote(args, org, target, op, request)  # a hub on another machine
        return call(target.state_directory, op, request)

    failed = False
    result: Any
    if every:  # --server '*': every server of the organization, one list
        result = []
        for target in org.servers:
            try:
                result.extend(ask(target))
            except ControlError as exc:
                print(f"hubport: {target.name}: {exc}", file=sys.stderr)
                failed = True
    else:
        try:
            result = ask(server)
        except ControlError as exc:
            print(f"hubport: {exc}", file=sys.stderr)
            return 1
    if op == "export-message":
        import base64

        path = Path(args.path)
        try:
            write_export(path, base64.b64decode(result["data"]))
        except OSError as exc:
            print(f"hubport: cannot export to {path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        result = {"identity": result["identity"], "path": str(path), "size": result["size"]}
    fmt = "json" if getattr(args, "json", False) else args.format
    if fmt == "json":
        print(json.dumps(result, indent=2, default=str))
    elif op == "remove-message":
        ndr = "an NDR was sent to the sender" if result["ndr_sent"] else "no NDR"
        print(f"Removed {result['identity']}: {len(result['removed'])} recipient(s), {ndr}.")
    elif op == "export-message":
        print(f"Exported {result['identity']} to {result['path']} ({result['size']} bytes).")
    else:
        rows = result if isinstance(result, list) else [result]
        kind = "message" if op.endswith("-message") else "queue"
        print(queue_list(rows, kind) if fmt == "list" else queue_table(rows, kind))
        if op == "get-queue" and not every:
            note = _pressure_note(server.state_directory)
            if note:
                print(note)
    return 1 if failed else 0


def _pressure_note(state: Path) -> str | None:
    """Under Get-Queue's table: the back pressure level when it is not Normal."""
    from hubport.core.control import ControlError, call

    try:
        result = call(state, "get-backpressure")
    except ControlError:
        return None
    if result.get("level") == "Normal":
        return None
    causes = ", ".join(f"{m['resource']} {m['current_resource_use']}"
                       for m in result.get("meters", [])
                       if m["current_resource_use"] != "Normal")
    return (f"\nBack pressure {result['level']}: {result['effect']} ({causes});"
            " see hubport get-backpressure")


def _backpressure(args: argparse.Namespace) -> int:
    """Get-BackPressure: ask the running daemon (``BackPressure.snapshot``)."""
    from hubport.core.control import ControlError, call

    _, _, server = _load(args)
    try:
        result = call(server.state_directory, "get-backpressure")
    except ControlError as exc:
        print(f"hubport: {exc}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(format_backpressure(result, as_list=args.format == "list"))
    return 0


def format_backpressure(state: dict[str, Any], as_list: bool = False) -> str:
    """The monitor's snapshot for people: the server's level, one row per resource, the
    recent level changes."""
    from hubport.core.queue_view import clock

    head = f"Back pressure on {state['server']}: {state['level']} ({state['effect']})"
    if not state.get("enabled"):
        head += "\nResource monitoring is off (EnableResourceMonitoring = false)."
    workers = state.get("workers") or []  # a server of several workers: each one's level
    if len(workers) > 1:
        head += "\n" + "\n".join(
            f"  worker {w['worker']}: {w['level']}"
            + (f" ({', '.join(w['causes'])})" if w["causes"] else "") for w in workers)
    meters = state.get("meters", [])
    if as_list:
        blocks = ["\n".join(f"{name:<20}: {value}" for name, value in (
            ("Resource", m["resource"]), ("Pressure", f"{m['pressure']:g} {m['unit']}".strip()),
            ("CurrentResourceUse", m["current_resource_use"]),
            ("PreviousResourceUse", m["previous_resource_use"]),
            ("PressureTransitions", m["pressure_transitions"]), ("Since", clock(m["since"])),
            ("Detail", m["detail"]))) for m in meters]
        body = "\n\n".join(blocks)
    else:
        width = max([len("Resource"), *(len(m["resource"]) for m in meters)])
        lines = [f"{'Resource':<{width}} {'Pressure':>12}  {'Use':<7} {'Previous':<8}  "
                 f"{'Normal/Medium/High':<20}  Detail"]
        for m in meters:
            t = m["thresholds"]
            limits = "/".join(f"{t[k]:g}" for k in ("Normal", "Medium", "High")) if t else "-"
            figure = f"{m['pressure']:g} {m['unit']}".strip() if t else "-"
            lines.append(f"{m['resource']:<{width}} {figure:>12}  "
                         f"{m['current_resource_use']:<7} {m['previous_resource_use']:<8}  "
                         f"{limits:<20}  {m['detail']}")
        body = "\n".join(lines)
    changes = [f"{clock(c['at'])}  {c['resource']}: {c['from']} -> {c['to']}"
               + (f" at {c['pressure']:g} {c['unit']}".rstrip() if c["unit"] else "")
               + (f" (worker {c['worker']})" if len(workers) > 1 and "worker" in c else "")
               for c in state.get("transitions", [])[-10:]]
    tail = "\n\nRecent level changes:\n" + "\n".join(changes) if changes else ""
    return f"{head}\n\n{body}{tail}"


#: the arguments each queue command sends to the daemon (hubport.core.queue_admin.QueueAdmin)
_QUEUE_ARGS: dict[str, tuple[str, ...]] = {
    "get-queue": ("identity", "filter"),
    "retry-queue": ("identity", "resubmit"),
    "suspend-queue": ("identity",),
    "resume-queue": ("identity",),
    "get-message": ("identity", "queue", "filter", "result_size"),
    "suspend-message": ("identity",),
    "resume-message": ("identity",),
    "remove-message": ("identity", "with_ndr"),
    "export-message": ("identity", "path"),
}


def _add_queue_commands(sub: Any) -> None:
    """Get-Queue, Retry-/Suspend-/Resume-Queue, Get-/Suspend-/Resume-/Remove-/Export-Message."""
    helps = {
        "get-queue": "list the queues of the running daemon (Get-Queue)",
        "retry-queue": "make a queue in Retry try now; --resubmit re-categorizes it",
        "suspend-queue": "stop a queue's transmissions (Submission: the categorizer)",
        "resume-queue": "resume a suspended queue",
        "get-message": "list queued messages (Get-Message)",
        "suspend-message": "hold a queued message",
        "resume-message": "release a held message (from Poison: back to the categorizer)",
        "remove-message": "remove a queued message; --with-ndr tells the sender",
        "export-message": "write a suspended message as a Replay file (Export-Message)",
    }
    for op, names in _QUEUE_ARGS.items():
        cmd = sub.add_parser(op, help=helps[op])
        _common(cmd)
        needs_identity = op not in ("get-queue", "get-message")
        cmd.add_argument("--identity", "-identity", required=needs_identity,
                         help="Server\\Queue, or Server\\Queue\\MessageId for messages")
        if "filter" in names:
            cmd.add_argument("--filter", "-filter",
                             help="e.g. \"Status -eq 'Retry' -and MessageCount -gt 5\"")
        if "queue" in names:
            cmd.add_argument("--queue", "-queue", help="the queue whose messages to list")
        if "result_size" in names:
            cmd.add_argument("--resultsize", "-resultsize", dest="result_size", type=int)
        if "resubmit" in names:
            cmd.add_argument("--resubmit", "-resubmit", action="store_true")
        if "with_ndr" in names:
            cmd.add_argument("--with-ndr", "-withndr", dest="with_ndr", action="store_true")
        if "path" in names:
            cmd.add_argument("--path", "-path", required=True, type=Path)
        cmd.add_argument("--format", "-format", default="table",
                         choices=["table", "list", "json"])
        cmd.add_argument("--json", action="store_true", help="same as --format json")
        _certificate_option(cmd)


def _certificate_option(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--certificate", "-certificate", type=Path,
                     default=os.environ.get("HUBPORT_ADMIN_CERTIFICATE") or None,
                     help="reach --server's management endpoint (ManagementBindings) as the"
                          " administrator of this PEM (new-admincertificate); default:"
                          " $HUBPORT_ADMIN_CERTIFICATE, else this machine's files and socket")




def _size(text: str) -> int:
    from hubport.core.config_fields import parse_size

    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size is None:
        raise argparse.ArgumentTypeError("a message has a size: give bytes, e.g. 10MB")
    return size


def _test_route(args: argparse.Namespace) -> int:
    """Test-Route: the categorizer and routing table of --server, run on nothing real."""
    import asyncio

    from hubport.core.addresses import AddressError, normalize_address
    from hubport.core.route_report import format_report, route_report

    hooks, org, server = _load(args)
    try:
        recipient = normalize_address(args.recipient, smtputf8=True)
        sender = normalize_address(args.sender, smtputf8=True, allow_null=True)
    except AddressError as exc:
        print(f"hubport: not an address: {exc}", file=sys.stderr)
        return 2
    from hubport.core.control import ControlError, call

    try:  # the running daemon's connectors that failed over (ConnectorFailover NextCost)
        failover = call(server.state_directory, "get-failover")
    except ControlError:
        failover = None
    report = asyncio.run(route_report(org, server, hooks, recipient, sender=sender,
                                      size=args.size, failover=failover))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _new_server_certificate(args: argparse.Namespace) -> int:
    """New-ServerCertificate for another machine's hub: the files to copy there."""
    from hubport.core.internal_tls import issue_for, organization_ca_folder
    from hubport.core.tls import TlsConfigError

    _, org, server = _load(args)
    target = _named_server(org, args.identity)
    if target is None:
        return 1
    out = args.out or Path.cwd() / f"{target.name}-certificate"
    try:
        written = issue_for(org, target.name, out, here=server)
    except (TlsConfigError, OSError) as exc:
        print(f"hubport: cannot issue a certificate for {target.name}: {exc}", file=sys.stderr)
        return 1
    cert, key, ca = written
    folder = target.state_directory / "certs" / "internal"
    print(f"Issued an internal transport certificate for {target.name} ({target.fqdn}):")
    for path in written:
        print(f"  {path}")
    print(f"On {target.name}'s machine, put {cert.name} and {key.name} (mode 0600) in {folder}"
          f" and {ca.name} in {organization_ca_folder(org, target)}, or name them in its"
          f" InternalTransportCertificateFile, InternalTransportCertificateKeyFile and"
          f" InternalTransportCertificateAuthorityFile. The CA's key stays here"
          f" ({organization_ca_folder(org, server) / 'ca.key'}).")
    return 0


def _new_admin_certificate(args: argparse.Namespace) -> int:
    """An administrator's certificate for the hubs' management endpoints."""
    from hubport.core.management import issue_admin
    from hubport.core.tls import TlsConfigError

    _, org, _ = _load(args)
    out = args.out or Path.cwd() / f"{args.identity}-admin"
    try:
        pem, ca = issue_admin(org, args.identity, out)
    except (TlsConfigError, OSError, ValueError) as exc:
        print(f"hubport: cannot issue an administrator's certificate: {exc}", file=sys.stderr)
        return 1
    print(f"Issued an administrator's certificate for {args.identity}:\n  {pem}\n  {ca}\n"
          f"Keep {pem.name} private (it holds the key). Use it with any queue command:"
          f" hubport get-queue --server HUB02 --certificate {pem}")
    return 0


def _set_password(args: argparse.Namespace) -> int:
    """Store a mailbox password hash in the server's PasswordFilePath (never echoed or logged)."""
    from hubport.core.credentials import PasswordStore, mailbox_for_login

    _, org, server = _load(args)
    mailbox = mailbox_for_login(org, args.mailbox)
    if mailbox is None:
        print(f"hubport: no mailbox {args.mailbox!r} (give an alias, name or SMTP address)",
              file=sys.stderr)
        return 1
    password = _read_password(args.password_stdin)
    if password is None:
        return 1
    try:
        PasswordStore(server.password_file_path).set_password(mailbox, password)
    except OSError as exc:
        print(f"hubport: cannot write {server.password_file_path}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    print(f"Password set for mailbox {mailbox.name} in {server.password_file_path}.")
    return 0


def _read_password(from_stdin: bool) -> str | None:
    """One line of stdin, or asked twice without echo; None (reason printed) when refused."""
    import getpass

    if from_stdin:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    else:
        try:
            password = getpass.getpass("New password: ")
            again = getpass.getpass("Repeat the password: ")
        except (EOFError, KeyboardInterrupt):
            print("\nhubport: no password given", file=sys.stderr)
            return None
        if password != again:
            print("hubport: the passwords do not match", file=sys.stderr)
            return None
    if not password:
        print("hubport: the password must not be empty", file=sys.stderr)
        return None
    return password


if __name__ == "__main__":
    raise SystemExit(main())
