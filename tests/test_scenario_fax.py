"""The article's fax gateway (docs/scenarios.md, scenario 5): the embedded default's Foreign
connector for ``FAX:*`` writes to its drop folder; a gateway process (a real subprocess,
examples/fax-gateway/fax_gateway.py) consumes the drop files and writes its status replies
into ``replay/``; the replies reach the sender's mailbox."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_process import daemon_pool
from scenario_support import fresh_home, run
from support import drop_in, maildir, message, read_mail, wait_for_sync

pytestmark = pytest.mark.timeout(120)

GATEWAY = Path(__file__).parent.parent / "examples" / "fax-gateway" / "fax_gateway.py"



def test_a_fax_goes_out_through_the_drop_folder_and_its_status_comes_back(
        tmp_path: Path) -> None:
    home = fresh_home(tmp_path)
    route = run(home, "Test-Route FaxReception@contoso.test").stdout
    assert "Fax Gateway" in route, route
    with daemon_pool(tmp_path) as pool:
        pool.start(cwd=home).wait_ready()
        drop = home / "drop" / "Fax Gateway"
        gateway = subprocess.Popen(
            [sys.executable, str(GATEWAY), "--drop", str(drop), "--replay",
             str(home / "replay"), "--interval", "0.2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            drop_in(home / "pickup", "fax.eml", message(
                sender="alice@contoso.test", to="FaxReception@contoso.test",
                subject="Signed contract"))
            wait_for_sync(lambda: maildir(home, "Alice"), timeout=30,
                          what="the gateway's status reply in Alice's mailbox")
            (reply,) = maildir(home, "Alice")
            mail = read_mail(reply)
            assert mail["Subject"] == "Fax sent: Signed contract", mail["Subject"]
            assert "+15551234" in mail.get_payload()
        finally:
            gateway.send_signal(signal.SIGTERM)
            output = gateway.communicate(timeout=10)[0].decode()
        assert gateway.returncode == 0, output
        assert list(drop.glob("*.eml")) == []  # every drop file taken over
        (done,) = (drop.parent / "Fax Gateway.done").glob("*.eml")
        assert b"X-Receiver: <IMCEAFAX-+2B15551234@contoso.test>" in done.read_bytes()
        log = (drop.parent / "Fax Gateway.sent.log").read_text()
        assert "'Signed contract' to +15551234 for alice@contoso.test" in log, log

        events = json.loads(run(home, "Get-MessageTrackingLog -ResultSize Unlimited"
                                       " | Select-Object EventId,Source,ConnectorId"
                                       " | ConvertTo-Json").stdout)
        pairs = [(e["EventId"], e["Source"], e["ConnectorId"]) for e in events]
        assert pairs == [("RECEIVE", "PICKUP", "Pickup"), ("RESOLVE", "RESOLVER", ""),
                         ("DELIVER", "GATEWAY", "Fax Gateway"),  # into the drop folder
                         ("RECEIVE", "ADMIN", "Replay"),  # the gateway's status reply
                         ("DELIVER", "STOREDRIVER", "")], pairs  # in Alice's mailbox
