"""The organization cmdlets (core/org_cmdlets.py): New-/Set-/Get-/Remove- typed as Exchange
administrators type them, against a file (comments kept, written only when valid), against
the embedded default (written out to ./hubport.toml), against a running daemon (a connector
made live carries mail without a restart; a binding changed live is rebound) and against
an organization in etcd."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from article_lines import ARTICLE
from daemon_process import DaemonPool, daemon_pool, hubport
from etcd_peer import etcd_cluster
from scenario_support import call
from send_peers import ScriptedSink
from smtp_support import Client, body, free_port, receive_connector, send_one
from support import drop_in, maildir, message, read_mail, wait_for_sync, write_org

pytestmark = pytest.mark.timeout(180)


def test_the_embedded_default_is_written_out_then_edited_with_its_comments(
        tmp_path: Path) -> None:
    done = hubport("New-Mailbox -Name Carol -PrimarySmtpAddress carol@contoso.test",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "./hubport.toml" in done.stderr
    text = (tmp_path / "hubport.toml").read_text()
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert len(comments) > 50 and 'Name = "Carol"' in text

    shown = hubport("get-mailbox ‘carol’ | ConvertTo-Json", cwd=tmp_path)
    assert json.loads(shown.stdout) == [{"Name": "Carol",
                                         "PrimarySmtpAddress": "carol@contoso.test"}]
    # a typo and a bad value: the load's errors, naming the fix; the file is not touched
    before = (tmp_path / "hubport.toml").read_bytes()
    typo = hubport("Set-ReceiveConnector 'HUB01\\Default HUB01' -remoteIPrantes 127.0.0.1",
                   cwd=tmp_path)
    assert typo.returncode == 2 and 'did you mean "RemoteIPRanges"' in typo.stderr
    bad = hubport("Set-Mailbox Carol -Server HUB9", cwd=tmp_path)
    assert bad.returncode == 2 and 'did you mean "HUB01"' in bad.stderr, bad.stderr
    unknown = hubport("Remove-Mailbox Karol", cwd=tmp_path)
    assert unknown.returncode == 2 and 'did you mean "Carol"' in unknown.stderr
    assert (tmp_path / "hubport.toml").read_bytes() == before

    assert hubport("Remove-Mailbox Carol -WhatIf", cwd=tmp_path).stdout.startswith("What if")
    assert 'Name = "Carol"' in (tmp_path / "hubport.toml").read_text()
    assert hubport("Remove-Mailbox Carol -Confirm:$false", cwd=tmp_path).returncode == 0
    after = (tmp_path / "hubport.toml").read_text()
    assert 'Name = "Carol"' not in after
    assert [line for line in after.splitlines() if line.lstrip().startswith("#")] == comments
    # every command here now reads ./hubport.toml
    checked = hubport("test-config", cwd=tmp_path)
    assert checked.returncode == 0 and "hubport.toml: valid" in checked.stdout


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[DaemonPool]:
    with daemon_pool(tmp_path) as daemons:
        yield daemons


def test_a_connector_made_live_carries_mail_and_a_binding_changed_live_is_rebound(
        tmp_path: Path, pool: DaemonPool) -> None:
    port, moved = free_port(), free_port()
    config = write_org(tmp_path, extra=receive_connector(
        "Default HUB01", [f"127.0.0.1:{port}"], PermissionGroups=["AnonymousUsers"]))
    pool.start(config=config).wait_ready(60)
    with ScriptedSink() as sink:
        line = ('New-SendConnector -Name "To Internet" -Usage Custom -AddressSpaces'
                f' "SMTP:*;1" -DNSRoutingEnabled $false -SmartHosts "[127.0.0.1]" -Port'
                f' {sink.port} -SmartHostAuthMechanism None -SourceTransportServers HUB01')
        done = hubport(line, "--config", str(config), cwd=tmp_path)
        assert done.returncode == 0, done.stderr

        drop_in(tmp_path / "pickup", "out.eml", message(
            sender="alice@contoso.test", to="someone@example.org",
            subject="through the new connector"))
        wait_for_sync(lambda: sink.received, 60, what="mail through the connector made live")

        done = hubport(f"Set-ReceiveConnector 'HUB01\\Default HUB01' -Bindings"
                       f" 127.0.0.1:{moved}", "--config", str(config), cwd=tmp_path)
        assert done.returncode == 0, done.stderr

        def rebound() -> bool:
            try:
                asyncio.run(send_one(moved, "bob@contoso.test", "on the new binding"))
            except OSError:
                return False
            return True

        wait_for_sync(rebound, 60, what="the receive connector on its new binding")
        with pytest.raises(OSError):  # and no longer on the old one
            asyncio.run(send_one(port, "bob@contoso.test", "on the old binding"))


def test_the_cmdlets_edit_an_organization_in_etcd(tmp_path: Path) -> None:
    with etcd_cluster(tmp_path) as cluster:
        url = cluster.url("contoso")
        write_org(tmp_path)
        pushed = hubport("push-organization", str(tmp_path / "org.toml"), "--config", url,
                         cwd=tmp_path)
        assert pushed.returncode == 0, pushed.stderr
        done = hubport("New-Mailbox Dora -PrimarySmtpAddress dora@contoso.test", "--config",
                       url, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        shown = hubport("Get-Mailbox Dora", "--config", url, "--json", cwd=tmp_path)
        assert json.loads(shown.stdout)[0]["PrimarySmtpAddress"] == "dora@contoso.test"
        refused = hubport("Set-Mailbox Dora -Server HUB7", "--config", url, cwd=tmp_path)
        assert refused.returncode == 2 and "Server" in refused.stderr


def test_a_script_of_cmdlet_lines_runs_in_order_and_stops_at_the_first_failure(
        tmp_path: Path) -> None:
    (tmp_path / "setup.ps1").write_text(
        "# a script of cmdlet lines, as an administrator keeps them\n"
        "New-Mailbox -Name Erin -PrimarySmtpAddress erin@contoso.test\n"
        "\n"
        "Add-DistributionGroupMember -Identity Staff -Member erin@contoso.test\n"
        "Add-DistributionGroupMember -Identity Staff -Member ERIN@contoso.test\n"
        "New-Mailbox -Name Never -PrimarySmtpAddress never@contoso.test\n")
    done = hubport("shell", "setup.ps1", cwd=tmp_path)
    assert done.returncode == 2, done.stdout
    assert "setup.ps1:5: stopped here" in done.stderr and "already a member" in done.stderr
    members = hubport("Get-DistributionGroup Staff", "--json", cwd=tmp_path)
    assert "erin@contoso.test" in json.loads(members.stdout)[0]["Members"]
    assert 'Name = "Never"' not in (tmp_path / "hubport.toml").read_text()
    removed = hubport("Remove-DistributionGroupMember Staff -Member Erin@contoso.test",
                      cwd=tmp_path)
    assert removed.returncode == 0, removed.stderr
    prompt = hubport("shell", cwd=tmp_path, input="Get-Command\nget-mailbox erin\nexit\n")
    assert "Get-Queue" in prompt.stdout and "erin@contoso.test" in prompt.stdout


def test_every_change_is_in_the_admin_audit_log(tmp_path: Path, pool: DaemonPool) -> None:
    """Organization cmdlets and the queue cmdlets that act are recorded with the caller,
    the line and the revision; Search-AdminAuditLog filters them as Exchange's does."""
    config = write_org(tmp_path)
    pool.start(config=config).wait_ready(60)
    lines = ["New-Mailbox Gus -PrimarySmtpAddress gus@contoso.test",
             "Set-Mailbox Gus -MaxReceiveSize 5MB",
             "Suspend-Queue 'HUB01\\Submission' -Confirm:$false",
             "Resume-Queue 'HUB01\\Submission'"]
    for line in lines:
        done = hubport(line, "--config", str(config), cwd=tmp_path)
        assert done.returncode == 0, (line, done.stderr)
    hubport("Get-Mailbox Gus", "--config", str(config), cwd=tmp_path)  # not a change
    hubport("Set-Mailbox Gus -Server HUB9", "--config", str(config), cwd=tmp_path)  # refused

    every = json.loads(hubport("Search-AdminAuditLog", "--config", str(config), "--json",
                               cwd=tmp_path).stdout)
    assert [e["cmdlet-line"] for e in every] == lines
    assert all(e["caller"] and e["run-date"] for e in every)
    assert every[1]["object-ids"] == ["mailbox/Gus"] and every[1]["revision"].startswith(
        "sha256 ")
    only = json.loads(hubport("Search-AdminAuditLog -Cmdlets Set-Mailbox,Resume-Queue"
                              " -ObjectIds Gus | ConvertTo-Json", "--config", str(config),
                              cwd=tmp_path).stdout)
    assert [e["cmdlet"] for e in only] == ["Set-Mailbox"]
    later = json.loads(hubport("Search-AdminAuditLog -StartDate 2999-01-01", "--config",
                               str(config), "--json", cwd=tmp_path).stdout)
    assert later == []


def test_the_articles_lines_run_as_printed_or_name_the_fix(tmp_path: Path) -> None:
    """In the article's order, in one organization: each line runs, or fails naming the
    fix and changes nothing."""
    wrong = []
    for line, error in ARTICLE:
        before = (tmp_path / "hubport.toml").read_bytes() if (
            tmp_path / "hubport.toml").exists() else b""
        status, _out, err = call(tmp_path, line)  # the command's own main, in this process
        if error is None and status != 0:
            wrong.append(f"{line}\n  refused: {err}")
        elif error is not None and (status != 2 or error not in err):
            wrong.append(f"{line}\n  expected {error!r}, got {status}: {err}")
        elif error is not None and before:
            assert (tmp_path / "hubport.toml").read_bytes() == before, line
    assert not wrong, "\n".join(wrong)
    listed = hubport("Get-RoutingGroupConnector | Select-Object Name,TargetTransportServers"
                     " | ConvertTo-Json", cwd=tmp_path)
    assert json.loads(listed.stdout) == [
        {"Name": "RGCBidirection", "TargetTransportServers": ["EX2003BH1", "EX2003BH2"]}]


def test_a_rebind_keeps_the_sessions_in_progress_and_the_other_listeners(
        tmp_path: Path, pool: DaemonPool) -> None:
    """Set-ReceiveConnector -Bindings on a running daemon: a session already open on the
    old binding finishes its message; another connector's listener is not touched."""
    port, moved, other = free_port(), free_port(), free_port()
    config = write_org(tmp_path, extra=receive_connector(
        "Default HUB01", [f"127.0.0.1:{port}"], PermissionGroups=["AnonymousUsers"])
        + receive_connector("Other HUB01", [f"127.0.0.1:{other}"],
                            PermissionGroups=["AnonymousUsers"]))
    daemon = pool.start(config=config)
    daemon.wait_ready(60)

    async def scenario() -> None:
        session = await Client.connect(port)
        await session.hello()
        assert (await session.cmd("MAIL FROM:<someone@example.org>")).code == 250
        done = await asyncio.to_thread(
            hubport, f"Set-ReceiveConnector 'HUB01\\Default HUB01' -Bindings 127.0.0.1:{moved}",
            "--config", str(config), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        await asyncio.to_thread(daemon.wait_for_log, "configuration reloaded", 30)
        for _ in range(100):  # the new binding listens
            try:
                await send_one(moved, "bob@contoso.test", "on the new binding")
                break
            except OSError:
                await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"nothing listens on the new binding {moved}")
        # the session opened before the change finishes its message
        assert (await session.cmd("RCPT TO:<alice@contoso.test>")).code == 250
        assert (await session.cmd("DATA")).code == 354
        await session.send(body("begun before the rebind") + b"\r\n.\r\n")
        assert (await session.reply()).code == 250
        await session.close()
        await send_one(other, "alice@contoso.test", "the other listener")  # untouched
        with pytest.raises(OSError):
            await send_one(port, "bob@contoso.test", "on the old binding")

    asyncio.run(scenario())
    wait_for_sync(lambda: len(maildir(tmp_path, "Alice")) == 2, 60,
                  what="both of Alice's messages")
    subjects = sorted(read_mail(m)["Subject"] for m in maildir(tmp_path, "Alice"))
    assert subjects == ["begun before the rebind", "the other listener"]
