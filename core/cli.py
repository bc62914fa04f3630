"""The ``hubport`` command: run the daemon, inspect plugins, queues and the tracking log.

Management commands take Exchange's cmdlet names and parameter names, case-insensitively:
``hubport Get-MessageTrackingLog -EventId FAIL -Sender alice@contoso.test``.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core import __version__


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-config", type=Path, default=None,
                        help="organization TOML file (default: the embedded default)")
    parser.add_argument("--server", "-server", default=None,
                        help="the transport server this command acts for (default: the first)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hubport", description="hubport: an Exchange-style mail transport hub")
    parser.add_argument("--version", action="version", version=f"hubport {__version__}")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the transport daemon")
    _common(run)
    run.add_argument("--json-logs", action="store_true", default=None,
                     help="log JSON lines even on a terminal")

    plugins = sub.add_parser("plugins", help="list plugins, their hooks and the call order")
    _common(plugins)
    plugins.add_argument("--json", action="store_true")

    check = sub.add_parser("test-config", help="validate the organization file and exit")
    _common(check)

    track = sub.add_parser("get-messagetrackinglog",
                           help="search the message tracking log (Get-MessageTrackingLog)")
    _common(track)
    for name in ("start", "end"):
        track.add_argument(f"-{name}", dest=name, type=_when)
    for name in ("eventid", "messageid", "internalmessageid", "messagesubject", "sender",
                 "reference", "source"):
        track.add_argument(f"-{name}", dest=name)
    track.add_argument("-recipients", dest="recipients", nargs="+", default=[])
    track.add_argument("-resultsize", dest="resultsize", default="1000")
    track.add_argument("--format", "-format", dest="format", default="table",
                       choices=["table", "list", "json"])

    queue = sub.add_parser("get-queue", help="list the queues of this server (Get-Queue)")
    _common(queue)
    queue.add_argument("--json", action="store_true")
    return parser


def _when(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(_normalize_argv(sys.argv[1:] if argv is None else argv))
    from core.logsetup import configure

    configure(args.log_level, json=getattr(args, "json_logs", None))
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": _run, "plugins": _plugins, "test-config": _test_config,
        "get-messagetrackinglog": _tracking, "get-queue": _queue,
    }
    if args.command is None:
        _parser().print_help()
        return 2
    return commands[args.command](args)


def _run(args: argparse.Namespace) -> int:
    from core.daemon import run

    return run(args.config, args.server)


def _load(args: argparse.Namespace) -> Any:
    from core.daemon import StartupError, load, make_hooks, pick_server

    try:
        hooks = make_hooks(args.config)
        org = load(args.config, hooks)
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
    return 0


def _tracking(args: argparse.Namespace) -> int:
    from core.tracking import format_events, search

    _, _, server = _load(args)
    size = None if str(args.resultsize).lower() == "unlimited" else int(args.resultsize)
    events = search(server.message_tracking_log_path, start=args.start, end=args.end,
                    event_id=args.eventid, message_id=args.messageid,
                    internal_message_id=args.internalmessageid,
                    message_subject=args.messagesubject, recipients=args.recipients,
                    sender=args.sender, reference=args.reference, source=args.source,
                    result_size=size)
    print(format_events(events, args.format))
    return 0


def _queue(args: argparse.Namespace) -> int:
    from core.queue import queue_summary

    _, _, server = _load(args)
    db = server.state_directory / "queue" / "mail.que"
    if not db.exists():
        print(f"hubport: no queue database at {db} (has the daemon run?)", file=sys.stderr)
        return 1
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        rows = queue_summary(conn)
    finally:
        conn.close()
    for row in rows:
        row["identity"] = f"{server.name}\\{row['queue']}"
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"{'Identity':<28} {'DeliveryType':<26} {'Status':<10} {'MessageCount':>12}"
          "  NextHopDomain")
    for row in rows:
        print(f"{row['identity']:<28} {row['delivery_type']:<26} {row['status']:<10} "
              f"{row['message_count']:>12}  {row['next_hop']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
