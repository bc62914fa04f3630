"""Every example Get-Help prints (core/cmdlet_help.py), run as printed, in the Exchange form
and in the --json form: the organization examples on the embedded default written out to
./hubport.toml, the queue examples against the daemon running it with mail in Retry."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

from daemon_process import DaemonPool, daemon_pool, hubport
from hubport.core.cmdlet_help import EXAMPLES, get_help
from hubport.core.cmdlets import CMDLETS
from send_peers import free_port
from support import drop_in, message, wait_for_sync

QUEUE = {name for name in EXAMPLES if name.lower() in CMDLETS and name not in (
    "Get-TransportServer",)}
HELP = ("Get-Help", "Get-Command")  # they print text for people


def _run(home: Path, line: str, *extra: str) -> subprocess.CompletedProcess[str]:
    done = hubport(line, *extra, cwd=home)
    assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
    return done


def _json(home: Path, line: str) -> object:
    done = _run(home, line, "--json")
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"{line} --json printed no JSON: {done.stdout!r}") from exc


def _free_bindings(home: Path) -> None:
    """The embedded default's listeners moved to free ports, with the cmdlet."""
    for connector in ("Default HUB01", "Client HUB01"):
        _run(home, f"Set-ReceiveConnector 'HUB01\\{connector}'"
                   f" -Bindings 127.0.0.1:{free_port()}")


def test_every_example_of_get_help_runs_as_printed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    _free_bindings(home)
    organization = [(n, line) for n, examples in EXAMPLES.items() if n not in QUEUE
                    for line, _why in examples]
    for name, line in organization:
        _run(home, line)
        assert line in get_help(f"Get-Help {name} -Examples")
    text = (home / "hubport.toml").read_text()
    assert "To Smart Host" in text and "MaxReceiveSize" in text
    names = {str(t.get("Name")) for tables in tomllib.loads(text).values()
             if isinstance(tables, list) for t in tables}
    for made in ("Interop RGC", "First Routing Group", "HUB02", "Paris", "Contoso Archive",
                 "Contoso Foreign Connector", "MySendConnector", "Managers", "Kim Akers",
                 "Chris Ashton", "Tailspin"):
        assert made not in names, made  # the examples remove what they made, in order
    audit = json.loads(_run(home, "Search-AdminAuditLog", "--json").stdout)
    changes = [line for _n, line in organization if not line.startswith(
        ("Get-", "Search-"))]
    assert [e["cmdlet-line"] for e in audit][-len(changes):] == changes


def test_every_cmdlet_has_an_example() -> None:
    from hubport.core.cmdlet_help import catalogue

    assert sorted(e.name for e in catalogue() if e.name not in EXAMPLES) == []


def test_every_example_runs_in_its_json_form(tmp_path: Path) -> None:
    """The same lines with --json: each prints one JSON document (a change says what it
    changed and the revision; a Get- its objects)."""
    home = tmp_path / "home"
    home.mkdir()
    _free_bindings(home)
    for name, examples in EXAMPLES.items():
        for line, _why in examples:
            if name in QUEUE or name in HELP:
                continue
            answer = _json(home, line)
            if name.startswith(("Get-", "Search-")):
                assert isinstance(answer, list), (line, answer)
            else:
                assert isinstance(answer, dict) and answer["revision"], (line, answer)
            if name == "Set-RoutingGroupConnector":
                rgc = _json(home, "Get-RoutingGroupConnector 'Interop RGC' | Select-Object"
                                  " Name,Cost")
                assert rgc == [{"Name": "Interop RGC", "Cost": 50}]
            if name == "Remove-AcceptedDomain":
                assert answer["changed"] == ["accepted_domain/Tailspin"]  # type: ignore[index]


def test_the_queue_examples_run_as_printed_against_the_daemon(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    _free_bindings(home)
    smart_host = EXAMPLES["New-SendConnector"][1][0]
    assert "To Smart Host" in smart_host
    _run(home, smart_host)  # mail for the Internet waits on a smart host that is down
    with daemon_pool(tmp_path) as pool:
        _queue_examples(home, pool)


def _queue_examples(home: Path, pool: DaemonPool) -> None:
    daemon = pool.start(cwd=home)
    daemon.wait_ready()
    drop_in(home / "pickup", "q.eml", message(sender="alice@contoso.test",
                                              to="someone@fabrikam.example",
                                              subject="Quarterly report"))

    def retrying() -> object:
        rows = _json(home, "Get-Queue | Where-Object {$_.Status -eq 'Retry'}")
        return rows if rows else None
    wait_for_sync(retrying, timeout=60)

    def messages() -> list[dict[str, object]]:
        return _json(home, "Get-Message -Filter {FromAddress -like '*@contoso.test'}"
                     " | Select-Object Identity,Status,Subject")  # type: ignore[return-value]

    for name in ("Get-Queue", "Retry-Queue", "Suspend-Queue", "Resume-Queue", "Get-Message",
                 "Suspend-Message", "Export-Message", "Resume-Message",
                 "Get-MessageTrackingLog", "Test-Route", "Remove-Message"):
        for line, _why in EXAMPLES[name]:
            done = _run(home, line)
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
                assert isinstance(_json(home, line), list), line
    assert messages() == []  # Remove-Message -Filter took it, without an NDR
    assert not (home / "var" / "mailboxes" / "Alice" / "new").exists() or not list(
        (home / "var" / "mailboxes" / "Alice" / "new").iterdir())
