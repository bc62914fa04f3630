"""Every example Get-Help prints (core/cmdlet_help.py), run as printed, in the Exchange form
and in the --json form: the organization examples on the embedded default written out to
./hubport.toml (through the command's own ``main``, in this process: some 60 lines twice),
the queue examples with the ``hubport`` command against the daemon running it with mail in
Retry."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from daemon_process import DaemonPool, daemon_pool
from hubport.core.cmdlet_help import EXAMPLES, get_help
from hubport.core.cmdlets import CMDLETS
from scenario_support import fresh_home, in_process, json_of, run
from support import drop_in, message, wait_for_sync

QUEUE = {name for name in EXAMPLES if name.lower() in CMDLETS and name not in (
    "Get-TransportServer",)}
HELP = ("Get-Help", "Get-Command")  # they print text for people



def test_every_example_of_get_help_runs_as_printed(tmp_path: Path) -> None:
    home = fresh_home(tmp_path)
    organization = [(n, line) for n, examples in EXAMPLES.items() if n not in QUEUE
                    for line, _why in examples]
    for name, line in organization:
        in_process(home, line)
        assert line in get_help(f"Get-Help {name} -Examples")
    text = (home / "hubport.toml").read_text()
    assert "To Smart Host" in text and "MaxReceiveSize" in text
    names = {str(t.get("Name")) for tables in tomllib.loads(text).values()
             if isinstance(tables, list) for t in tables}
    for made in ("Interop RGC", "First Routing Group", "HUB02", "Paris", "Contoso Archive",
                 "Contoso Foreign Connector", "MySendConnector", "Managers", "Kim Akers",
                 "Chris Ashton", "Tailspin"):
        assert made not in names, made  # the examples remove what they made, in order
    audit = json.loads(in_process(home, "Search-AdminAuditLog", "--json"))
    changes = [line for _n, line in organization if not line.startswith(
        ("Get-", "Search-"))]
    assert [e["cmdlet-line"] for e in audit][-len(changes):] == changes


def test_every_cmdlet_has_an_example() -> None:
    from hubport.core.cmdlet_help import catalogue

    assert sorted(e.name for e in catalogue() if e.name not in EXAMPLES) == []


def test_every_example_runs_in_its_json_form(tmp_path: Path) -> None:
    """The same lines with --json: each prints one JSON document (a change says what it
    changed and the revision; a Get- its objects)."""
    home = fresh_home(tmp_path)
    for name, examples in EXAMPLES.items():
        for line, _why in examples:
            if name in QUEUE or name in HELP:
                continue
            answer = json.loads(in_process(home, line, "--json"))
            if name.startswith(("Get-", "Search-")):
                assert isinstance(answer, list), (line, answer)
            else:
                assert isinstance(answer, dict) and answer["revision"], (line, answer)
            if name == "Set-RoutingGroupConnector":
                rgc = json.loads(in_process(home, "Get-RoutingGroupConnector 'Interop RGC'"
                                                  " | Select-Object Name,Cost | ConvertTo-Json"))
                assert rgc == [{"Name": "Interop RGC", "Cost": 50}]
            if name == "Remove-AcceptedDomain":
                assert answer["changed"] == ["accepted_domain/Tailspin"]  # type: ignore[index]


def test_the_queue_examples_run_as_printed_against_the_daemon(tmp_path: Path) -> None:
    home = fresh_home(tmp_path)
    smart_host = EXAMPLES["New-SendConnector"][1][0]
    assert "To Smart Host" in smart_host
    run(home, smart_host)  # mail for the Internet waits on a smart host that is down
    with daemon_pool(tmp_path) as pool:
        _queue_examples(home, pool)


def _queue_examples(home: Path, pool: DaemonPool) -> None:
    daemon = pool.start(cwd=home)
    daemon.wait_ready()
    drop_in(home / "pickup", "q.eml", message(sender="alice@contoso.test",
                                              to="someone@fabrikam.example",
                                              subject="Quarterly report"))

    def retrying() -> object:
        rows = json_of(home, "Get-Queue | Where-Object {$_.Status -eq 'Retry'}")
        return rows if rows else None
    wait_for_sync(retrying, timeout=60)

    def messages() -> list[dict[str, object]]:
        return json_of(home, "Get-Message -Filter {FromAddress -like '*@contoso.test'}"
                     " | Select-Object Identity,Status,Subject")  # type: ignore[return-value]

    for name in ("Get-Queue", "Retry-Queue", "Suspend-Queue", "Resume-Queue", "Get-Message",
                 "Suspend-Message", "Export-Message", "Resume-Message",
                 "Get-MessageTrackingLog", "Test-Route", "Remove-Message"):
        for line, _why in EXAMPLES[name]:
            done = run(home, line)
            if name == "Get-Message":
                assert "Quarterly report" in done.stdout, done.stdout
            if name == "Suspend-Message":
                assert [m["Status"] for m in messages()] == ["Suspended"], messages()
            if name == "Export-Message":
                assert b"Quarterly report" in (home / "held.eml").read_bytes()
            if name == "Resume-Message":
                assert [m["Status"] for m in messages()] != ["Suspended"], messages()
            if name == "Get-MessageTrackingLog" and "RECEIVE" in line:
                assert "alice@contoso.test" in done.stdout, done.stdout
            if name == "Test-Route":
                assert "To Smart Host" in done.stdout, done.stdout
            if name.startswith("Get-"):  # and the --json form of each Get-
                assert isinstance(json_of(home, line), list), line
    assert messages() == []  # Remove-Message -Filter took it, without an NDR
    assert not (home / "var" / "mailboxes" / "Alice" / "new").exists() or not list(
        (home / "var" / "mailboxes" / "Alice" / "new").iterdir())
