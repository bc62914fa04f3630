"""The article's two ISPs (docs/scenarios.md, scenario 1): two Send connectors for ``*``,
ISP1 at cost 1 with two smart hosts and ISP2 at cost 2, set up with cmdlets only, real
daemons and real SMTP peers on loopback.

With ``ConnectorFailover NextCost`` the mail of ISP1, queued and new, moves to ISP2 once both
ISP1 hosts have failed for ``ConnectorFailoverAfter``, and new mail returns to ISP1 once a
host answers again; with Exchange's ``None`` it waits for ISP1 and ISP2 gets nothing."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from daemon_process import Daemon, daemon_pool
from scenario_support import QUICK_RETRIES, fresh_home, json_of, run
from send_peers import ScriptedSink, free_port
from support import drop_in, message, wait_for_sync

pytestmark = pytest.mark.timeout(180)

ISP1_HOSTS = ("127.0.0.2", "127.0.0.3")




def _setup(home: Path, failover: str, isp1_port: int, isp2_port: int) -> None:
    """The organization, with the cmdlets an administrator types (docs/scenarios.md)."""
    for line in (
        QUICK_RETRIES,
        f"Set-TransportConfig -ConnectorFailover {failover} -ConnectorFailoverAfter 00:00:03",
        "New-SendConnector -Name ISP1 -Usage Custom -AddressSpaces 'SMTP:*;1'"
        " -DNSRoutingEnabled $false -SmartHosts '[127.0.0.2]','[127.0.0.3]'"
        f" -Port {isp1_port} -SmartHostAuthMechanism None -SourceTransportServers HUB01",
        "New-SendConnector -Name ISP2 -Usage Custom -AddressSpaces 'SMTP:*;2'"
        f" -DNSRoutingEnabled $false -SmartHosts '[127.0.0.1]' -Port {isp2_port}"
        " -SmartHostAuthMechanism None -SourceTransportServers HUB01",
    ):
        run(home, line)


def _send(home: Path, name: str) -> None:
    drop_in(home / "pickup", f"{name}.eml", message(
        sender="alice@contoso.test", to=f"{name}@fabrikam.example", subject=name,
        message_id=f"<{name}@scenario.test>"))


def _subjects(sink: ScriptedSink) -> list[str]:
    return sorted(r.data.split(b"Subject: ")[1].split(b"\r\n")[0].decode()
                  for r in sink.received)


def _isp1_port() -> int:
    """A port free on both ISP1 addresses."""
    for _ in range(20):
        port = free_port(ISP1_HOSTS[0])
        try:
            with socket.socket() as s:
                s.bind((ISP1_HOSTS[1], port))
            return port
        except OSError:
            continue
    raise AssertionError("no port free on both ISP1 addresses")


def _start(tmp_path: Path, failover: str) -> tuple[Path, int, ScriptedSink, Any]:
    home = fresh_home(tmp_path)
    isp1_port = _isp1_port()
    isp2 = ScriptedSink(host="127.0.0.1")
    _setup(home, failover, isp1_port, isp2.port)
    return home, isp1_port, isp2, daemon_pool(tmp_path)


def _isp1_queue(home: Path) -> dict[str, Any] | None:
    rows = [r for r in json_of(home, "Get-Queue") if r.get("connector") == "ISP1"]
    return rows[0] if rows else None


def test_next_cost_failover_moves_queued_and_new_mail_and_comes_back(tmp_path: Path) -> None:
    home, isp1_port, isp2, pools = _start(tmp_path, "NextCost")
    timeline: list[str] = []
    t0 = time.monotonic()

    def mark(what: str) -> None:
        timeline.append(f"{time.monotonic() - t0:6.1f}s {what}")

    with isp2, pools as pool:
        daemon: Daemon = pool.start(cwd=home)
        daemon.wait_ready()
        _send(home, "queued")
        mark("message 'queued' dropped in pickup; both ISP1 hosts down")
        retry = wait_for_sync(lambda: (r := _isp1_queue(home)) and r["status"] == "Retry"
                              and r, timeout=30, what="ISP1's queue in Retry")
        mark(f"ISP1's queue in Retry: {retry['last_error']}")
        wait_for_sync(lambda: _subjects(isp2) == ["queued"], timeout=30,
                      describe=lambda: _subjects(isp2), what="the queued mail via ISP2")
        mark("'queued' delivered by ISP2 (moved)")
        moved = json_of(home, "Get-MessageTrackingLog -EventId RESUBMIT")
        assert len(moved) == 1 and moved[0]["connector-id"] == "ISP1"
        assert "ISP1 -> ISP2" in moved[0]["source-context"], moved
        queue = _isp1_queue(home)
        if queue is not None:  # Get-Queue says why ISP1's mail went elsewhere
            assert "failed over to ISP2" in queue["failover"], queue
        route = run(home, "Test-Route -Recipient someone@fabrikam.example").stdout
        assert "ISP1: failed over to ISP2" in route and "chosen: ISP2" in route, route
        mark("Test-Route: ISP1 failed over, ISP2 chosen")

        _send(home, "new")
        wait_for_sync(lambda: _subjects(isp2) == ["new", "queued"], timeout=30,
                      describe=lambda: _subjects(isp2), what="new mail via ISP2")
        mark("'new' delivered by ISP2 while ISP1 is failed over")

        isp1 = ScriptedSink(host=ISP1_HOSTS[0], port=isp1_port)
        with isp1:
            mark("ISP1's first host answers again")
            wait_for_sync(lambda: "chosen: ISP1" in run(
                home, "Test-Route -Recipient someone@fabrikam.example").stdout,
                timeout=30, what="the probe to find ISP1 again")
            mark("probe: ISP1 answers; failover state cleared")
            _send(home, "back")
            wait_for_sync(lambda: _subjects(isp1) == ["back"], timeout=30,
                          describe=lambda: _subjects(isp1), what="new mail back on ISP1")
            mark("'back' delivered by ISP1")
        assert _subjects(isp2) == ["new", "queued"]  # each message once
        assert "failed over to the next cost" in daemon.log_text()
        assert "answers again" in daemon.log_text()
    print("\n".join(["two ISPs, NextCost:", *timeline]))


def test_without_failover_mail_waits_for_isp1_as_exchange_does(tmp_path: Path) -> None:
    home, _isp1_port, isp2, pools = _start(tmp_path, "None")
    with isp2, pools as pool:
        daemon = pool.start(cwd=home)
        daemon.wait_ready()
        _send(home, "waits")
        wait_for_sync(lambda: (r := _isp1_queue(home)) and r["status"] == "Retry"
                      and r, timeout=30, what="ISP1's queue in Retry")
        time.sleep(6)  # twice ConnectorFailoverAfter: with None nothing moves
        queue = _isp1_queue(home)
        assert queue is not None and queue["message_count"] == 1, queue
        assert isp2.received == []
        assert json_of(home, "Get-MessageTrackingLog -EventId RESUBMIT") == []
        route = run(home, "Test-Route -Recipient someone@fabrikam.example").stdout
        assert "chosen: ISP1" in route and "Connector failover: None" in route, route
