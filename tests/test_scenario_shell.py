"""The article's cmdlet lines at the management shell (docs/scenarios.md, scenario 8): the
lines that run, as a script for ``hubport shell``, against a daemon running the embedded
default. The daemon applies them live: the Receive connectors they make listen, and
Test-Route takes the Send connector they make. (The lines that must fail, each naming its
fix, are checked one by one in tests/test_org_cmdlets.py.)"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from article_lines import ARTICLE
from daemon_process import daemon_pool, hubport
from scenario_support import fresh_home, run
from support import wait_for_sync

pytestmark = pytest.mark.timeout(120)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0



def test_the_articles_lines_as_a_script_change_the_running_daemon(tmp_path: Path) -> None:
    home = fresh_home(tmp_path)
    script = home / "article.ps1"
    script.write_text("# the article's lines that run, as printed (our names)\n"
                      + "\n".join(line for line, error in ARTICLE if error is None) + "\n",
                      encoding="utf-8")
    with daemon_pool(tmp_path) as pool:
        daemon = pool.start(cwd=home)
        daemon.wait_ready()
        done = hubport("shell", str(script), cwd=home)
        assert done.returncode == 0, done.stderr
        daemon.wait_for_log("configuration reloaded", 30)
        for port in (2626, 2725, 2727):  # From App, Receiveconnector:25 and :27
            wait_for_sync(lambda p=port: _listening(p), timeout=30,
                          what=f"a listener on 127.0.0.1:{port}")
        route = run(home, "Test-Route someone@example.org").stdout
        assert "chosen: To Internet" in route, route
        audit = run(home, "Search-AdminAuditLog | Select-Object -ExpandProperty"
                           " CmdletName").stdout.split()
        assert "New-RoutingGroupConnector" in audit and "Set-Foreignconnector".lower() in [
            a.lower() for a in audit], audit
