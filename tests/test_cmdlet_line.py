"""The cmdlet line (core/cmdlet_line.py, core/cmdlets.py): PowerShell's quoting, binding and
pipeline conventions as the management shell reads them, and each error naming the fix."""

from __future__ import annotations

import json

import pytest

from hubport.core.cmdlet_line import CmdletError, Parameter, bind, split_pipeline, tokenize
from hubport.core.cmdlet_output import apply, read_stages, render
from hubport.core.cmdlets import is_cmdlet_line, to_argv

PARAMS = (Parameter("Identity", positional=True), Parameter("Queue"), Parameter("QueueSize"),
          Parameter("Resubmit", switch=True, default=False), Parameter("Server"))


def values(line: str) -> dict[str, object]:
    tokens = tokenize(line)
    return bind("Test-It", tokens, PARAMS).values


@pytest.mark.parametrize(("line", "identity"), [
    ("'HUB01\\4'", "HUB01\\4"),
    ('"HUB01\\4"', "HUB01\\4"),
    ("‘HUB01\\4’", "HUB01\\4"),
    ("'‘HUB01\\4’'", "HUB01\\4"),  # typographic quotes inside ASCII ones
    ("“HUB01\\4'", "HUB01\\4"),  # a mismatched pair, as printed documents have them
    ("«HUB01\\4»", "HUB01\\4"),
    ("-identity:HUB01\\4", "HUB01\\4"),
    ("-IDENTITY HUB01\\4", "HUB01\\4"),
    ("-Id 'with space'", "with space"),
])
def test_quotes_case_and_prefixes(line: str, identity: str) -> None:
    assert values(line)["Identity"] == identity


def test_switches_booleans_and_prefix_errors() -> None:
    assert values("x -Resubmit")["Resubmit"] is True
    assert values("x -Resubmit:$false")["Resubmit"] is False
    with pytest.raises(CmdletError, match="-Queue, -QueueSize"):
        values("x -Qu a")  # ambiguous: both candidates named
    assert values("x -Queue a")["Queue"] == "a"  # an exact name is never ambiguous
    with pytest.raises(CmdletError, match='did you mean "Server"'):
        values("x -Srever HUB01")
    with pytest.raises(CmdletError, match="single quotes"):
        values("x -Server")
    with pytest.raises(CmdletError, match="never closed"):
        tokenize("'HUB01")


def test_the_pipeline_splits_outside_quotes_and_braces() -> None:
    assert split_pipeline("Get-Queue -Filter 'a|b' | Where-Object {$_.x -eq '|'} | fl") == [
        "Get-Queue -Filter 'a|b'", "Where-Object {$_.x -eq '|'}", "fl"]
    with pytest.raises(CmdletError, match="empty stage"):
        split_pipeline("Get-Queue | | fl")


def _argv(line: str, extra: list[str] | None = None) -> tuple[list[str], str]:
    invocation = to_argv(line, extra or [])
    return invocation.argv, invocation.what_if


def test_cmdlets_become_the_hubport_commands_with_exchange_defaults() -> None:
    argv, what_if = _argv("Remove-Message HUB01\\3\\7")
    assert argv[0] == "remove-message" and "--with-ndr" in argv and not what_if
    argv, _ = _argv("remove-message -identity HUB01\\3\\7 -withndr $false")
    assert "--with-ndr" not in argv
    _, what_if = _argv("Suspend-Queue HUB01\\3 -WhatIf")
    assert what_if == 'What if: Suspend-Queue on "HUB01\\3".'
    argv, _ = _argv("Get-Queue | Format-List")
    assert argv[-2:] == ["--format", "list"]
    argv, _ = _argv("Get-Message -ResultSize Unlimited | ft", ["--json"])
    assert argv[-1:] == ["--json"] and "--resultsize" not in argv
    argv, _ = _argv("Get-MessageTrackingLog -Recipients a@x.test,'b@x.test' -EventId FAIL")
    assert argv[argv.index("-recipients") + 1:argv.index("-recipients") + 3] == [
        "a@x.test", "b@x.test"]
    argv, _ = _argv("Get-MessageTrackingLog -Recipients a@x.test, 'b@x.test' | ConvertTo-Json")
    assert argv[argv.index("-recipients") + 1:argv.index("-recipients") + 3] == [
        "a@x.test", "b@x.test"] and argv[-1] == "--json"
    selected = to_argv("Get-Queue | Where-Object {$_.Status -eq 'Retry'} | Select-Object"
                       " Identity,MessageCount -First 2")
    assert selected.argv[-3:] == ["--filter", "Status -eq 'Retry'", "--json"]
    assert selected.post is not None and selected.post.steps[0].properties == [
        "Identity", "MessageCount"]
    piped = to_argv("Get-Message -Queue HUB01\\3 | Suspend-Message")
    assert piped.argv[0] == "get-message" and piped.then == "Suspend-Message"
    filtered = to_argv("Remove-Message -Filter {FromAddress -eq 'a@x.test'} -WithNDR $false")
    assert filtered.argv[:1] == ["get-message"] and "--filter" in filtered.argv
    assert filtered.then == "Remove-Message -WithNDR:$false"
    with pytest.raises(CmdletError, match='did you mean "Get-Queue"'):
        to_argv("Get-Quue")
    with pytest.raises(CmdletError, match="ConvertTo-Json"):
        to_argv("Test-Route bob@contoso.test | fl")
    assert is_cmdlet_line("Get-Queue -Server HUB01") and is_cmdlet_line("Get-Help")
    assert not is_cmdlet_line("get-queue", ["get-queue"]) and not is_cmdlet_line("run")


def test_only_the_command_word_can_be_a_cmdlet_line() -> None:
    """A value that looks like Verb-Noun (a subject) is a value, never a cmdlet line."""
    from hubport.core.cli import _cmdlet

    words = ["get-messagetrackinglog", "-messagesubject", "Re-Send this"]
    assert _cmdlet(words).argv == words
    argv = _cmdlet(["--config", "org.toml", "Get-Queue -Server HUB01 | fl"]).argv
    assert argv == ["get-queue", "--config", "org.toml", "--server", "HUB01", "--format",
                    "list"]


def test_where_object_becomes_the_queue_cmdlets_filter() -> None:
    argv, _ = _argv("Get-Queue | Where-Object {$_.Status -eq 'Retry'} | ft")
    assert argv == ["get-queue", "--filter", "Status -eq 'Retry'", "--format", "table"]
    argv, _ = _argv("Get-Message -Filter \"Status -eq 'Retry'\" | ? {$_.Size -gt 5}")
    assert argv[argv.index("--filter") + 1] == "Status -eq 'Retry' -and Size -gt 5"
    with pytest.raises(CmdletError, match="prints a report, not objects"):
        to_argv("Test-Route bob@contoso.test | Where-Object {$_.x -eq 1}")


def test_object_stages_filter_sort_select_and_print_as_powershell_does() -> None:
    rows = [{"Name": "To Internet", "Cost": 5, "AddressSpaces": ["SMTP:*;5"],
             "Enabled": True},
            {"Name": "Partner", "Cost": 1, "AddressSpaces": ["SMTP:partner.example;1"],
             "Enabled": False},
            {"Name": "Backup", "Cost": 10, "AddressSpaces": ["SMTP:*;10"], "Enabled": True}]

    def run(*stages: str) -> list[object]:
        return apply(rows, read_stages(list(stages)))

    assert run("Where-Object {$_.Cost -lt 6 -and $_.Enabled -eq $true}") == [rows[0]]
    assert [r["Name"] for r in run("? {$_.AddressSpaces -like '*partner*' -or $_.Cost -ge"
                                   " 10}")] == ["Partner", "Backup"]  # type: ignore[index]
    assert run("Where-Object Name -match '^B'") == [rows[2]]  # the short form
    assert run("sort Cost -Descending", "select Name -First 2") == [
        {"Name": "Backup"}, {"Name": "To Internet"}]
    assert run("Select-Object -ExpandProperty AddressSpaces -Last 1") == ["SMTP:*;10"]
    assert run("select name,COST -Skip 2") == [{"Name": "Backup", "Cost": 10}]
    with pytest.raises(CmdletError, match='did you mean "Cost"'):
        run("Select-Object Cots")
    with pytest.raises(CmdletError, match='did you mean "Name"'):
        run("Where-Object {$_.Nmae -eq 'x'}")
    with pytest.raises(CmdletError, match="put Format-List"):
        read_stages(["fl", "Select-Object Name"])
    table = render(run("select Name,Cost,AddressSpaces"), "table")
    assert table.splitlines()[:2] == ["Name        Cost AddressSpaces",
                                      "----        ---- -------------"]
    assert "To Internet 5    {SMTP:*;5}" in table
    assert render(rows[:1], "list", ["Name", "Enabled"]) == (
        "Name    : To Internet\nEnabled : True\n")
    assert json.loads(render(run("select Name -First 1"), "json")) == [{"Name": "To Internet"}]


def test_hash_tables_and_lists_with_spaces_after_commas() -> None:
    [token] = [t for t in tokenize("-Servers @{Name='EX1'; Address=\"127.0.0.2\"; Port=2525},"
                                   " @{Name=EX2; Enabled=$true}") if t.tables]
    assert token.tables == ({"Name": "EX1", "Address": "127.0.0.2", "Port": 2525},
                            {"Name": "EX2", "Enabled": True})
    words = [t.text for t in tokenize("-A “HUB01”, “HUB02” -B «x», « y » z")]
    assert words == ["A", "HUB01,HUB02", "B", "x,y", "z"]
    with pytest.raises(CmdletError, match="is not Key = Value"):
        tokenize("-Servers @{Name}")


def test_tab_completion_offers_cmdlets_parameters_values_and_stages() -> None:
    from hubport.core.shell import completions

    assert "New-RoutingGroupConnector" in completions([])
    assert "-SmartHostAuthMechanism" in completions(["New-SendConnector"])
    assert "-Internet" in completions(["New-SendConnector"])
    assert completions(["New-SendConnector", "-Usage"]) == [
        "Custom", "Internal", "Internet", "Partner"]
    assert "ExternalAuthoritative" in completions(["set-receiveconnector", "-authmech"])
    assert completions(["Set-AcceptedDomain", "-MakeDefault"]) == ["$true", "$false"]
    assert "Select-Object" in completions(["Get-Queue", "|"])
    assert completions(["Get-Nothing"]) == []


def test_get_help_and_get_command() -> None:
    from hubport.core.cmdlet_help import EXAMPLES, catalogue, get_command, get_help

    names = [e.name for e in catalogue()]
    assert len(names) == len(set(names))
    assert all(name in names for name in EXAMPLES)
    full = get_help("Get-Help New-ReceiveConnector -Full")
    assert "-PermissionGroups <None | AnonymousUsers" in full and "Example 1" in full
    assert "[-Internet]" in full
    assert "-Bindings" in full and "[[receive_connector]]" in full
    assert get_help("Get-Help remove-message -Parameter WithNDR").strip() == "-WithNDR"
    table = get_command("Get-Command -Noun *Connector -Verb New")
    assert "New-SendConnector" in table and "Get-SendConnector" not in table
    with pytest.raises(CmdletError, match='did you mean "Get-Queue"'):
        get_help("Get-Help Get-Quue")
