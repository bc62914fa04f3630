"""The cmdlet line (core/cmdlet_line.py, core/cmdlets.py): PowerShell's quoting, binding and
pipeline conventions as the management shell reads them, and each error naming the fix."""

from __future__ import annotations

import pytest

from hubport.core.cmdlet_line import CmdletError, Parameter, bind, split_pipeline, tokenize
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


def test_cmdlets_become_the_hubport_commands_with_exchange_defaults() -> None:
    argv, what_if = to_argv("Remove-Message HUB01\\3\\7")
    assert argv[0] == "remove-message" and "--with-ndr" in argv and not what_if
    argv, _ = to_argv("remove-message -identity HUB01\\3\\7 -withndr $false")
    assert "--with-ndr" not in argv
    _, what_if = to_argv("Suspend-Queue HUB01\\3 -WhatIf")
    assert what_if == 'What if: Suspend-Queue on "HUB01\\3".'
    argv, _ = to_argv("Get-Queue | Format-List")
    assert argv[-2:] == ["--format", "list"]
    argv, _ = to_argv("Get-Message -ResultSize Unlimited | ft", ["--json"])
    assert argv[-2:] == ["--format", "json"] and "--resultsize" not in argv
    argv, _ = to_argv("Get-MessageTrackingLog -Recipients a@x.test,'b@x.test' -EventId FAIL")
    assert argv[argv.index("-recipients") + 1:argv.index("-recipients") + 3] == [
        "a@x.test", "b@x.test"]
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
    assert _cmdlet(words) == words
    argv = _cmdlet(["--config", "org.toml", "Get-Queue -Server HUB01 | fl"])
    assert argv == ["get-queue", "--config", "org.toml", "--server", "HUB01", "--format",
                    "list"]


def test_where_object_becomes_the_queue_cmdlets_filter() -> None:
    argv, _ = to_argv("Get-Queue | Where-Object {$_.Status -eq 'Retry'} | ft")
    assert argv == ["get-queue", "--filter", "Status -eq 'Retry'", "--format", "table"]
    argv, _ = to_argv("Get-Message -Filter \"Status -eq 'Retry'\" | ? {$_.Size -gt 5}")
    assert argv[argv.index("--filter") + 1] == "Status -eq 'Retry' -and Size -gt 5"
    with pytest.raises(CmdletError, match="filters Get-Queue and Get-Message"):
        to_argv("Test-Route bob@contoso.test | Where-Object {$_.x -eq 1}")
