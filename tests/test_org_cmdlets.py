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

from daemon_process import DaemonPool, daemon_pool, hubport
from etcd_peer import etcd_cluster
from send_peers import ScriptedSink
from smtp_support import free_port, receive_connector, send_one
from support import drop_in, message, wait_for_sync, write_org

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
