"""The article's smart host with each authentication choice (docs/scenarios.md, scenario 3),
set up with cmdlets only: one Send connector per choice, each to a real SMTP server that
checks it.

- None: no AUTH, whatever the server offers.
- BasicAuth: AUTH with the credential, no TLS needed.
- BasicAuthRequireTLS: STARTTLS first, then AUTH (the server refuses AUTH in clear).
- ExchangeServer: TLS with the hub's internal transport certificate as client certificate
  (the server requires one from the organization's CA).
- ExternalAuthoritative: the line is secured outside SMTP (IPsec, a private link): no AUTH.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from daemon_process import daemon_pool
from scenario_support import QUICK_RETRIES, fresh_home, run
from send_peers import ScriptedSink, free_port, make_ca
from support import drop_in, message, wait_for_sync

pytestmark = pytest.mark.timeout(120)

USERS = {"relay": "s3cret-relay"}
CHOICES = ("None", "BasicAuth", "BasicAuthRequireTLS", "ExchangeServer",
           "ExternalAuthoritative")



def _domain(choice: str) -> str:
    return f"{choice.lower()}.example"


def test_each_smart_host_authentication_choice_against_a_server_that_checks_it(
        tmp_path: Path) -> None:
    home = fresh_home(tmp_path, QUICK_RETRIES)
    (home / "relay.pw").write_text(USERS["relay"] + "\n")
    (home / "relay.pw").chmod(0o600)
    ports = {choice: free_port() for choice in CHOICES}
    for choice in CHOICES:
        credential = " -AuthenticationCredential @{UserName='relay'; PasswordFile='relay.pw'}" \
            if choice.startswith("BasicAuth") else ""
        run(home, f"New-SendConnector -Name 'Smart host {choice}' -Usage Custom"
                   f" -AddressSpaces 'SMTP:{_domain(choice)};1' -DNSRoutingEnabled $false"
                   f" -SmartHosts '[127.0.0.1]' -Port {ports[choice]}"
                   f" -SmartHostAuthMechanism {choice}{credential}"
                   " -SourceTransportServers HUB01")
    ca = make_ca(tmp_path)
    with daemon_pool(tmp_path) as pool:
        pool.start(cwd=home).wait_ready()
        # the organization's CA exists now: the ExchangeServer peer accepts only its hubs
        hubs_only = ca.server_context("smarthost.test")
        hubs_only.verify_mode = ssl.CERT_REQUIRED
        hubs_only.load_verify_locations(home / "hubport-ca" / "ca.crt")
        sinks = {
            "None": ScriptedSink(port=ports["None"], users=USERS),
            "BasicAuth": ScriptedSink(port=ports["BasicAuth"], users=USERS),
            "BasicAuthRequireTLS": ScriptedSink(
                port=ports["BasicAuthRequireTLS"], tls=ca.server_context("smarthost.test"),
                users=USERS, auth_require_tls=True),
            "ExchangeServer": ScriptedSink(port=ports["ExchangeServer"], tls=hubs_only),
            "ExternalAuthoritative": ScriptedSink(port=ports["ExternalAuthoritative"],
                                                  users=USERS),
        }
        for sink in sinks.values():
            sink.__enter__()
        try:
            for choice in CHOICES:
                drop_in(home / "pickup", f"{choice}.eml", message(
                    to=f"someone@{_domain(choice)}", subject=choice))
            wait_for_sync(lambda: all(s.received for s in sinks.values()), timeout=60,
                          describe=lambda: {c: len(s.received) for c, s in sinks.items()},
                          what="a message at each smart host")
        finally:
            for sink in sinks.values():
                sink.__exit__()
    got = {choice: sink.received for choice, sink in sinks.items()}
    assert all(len(r) == 1 for r in got.values()), got
    assert got["None"][0].auth is None
    assert got["BasicAuth"][0].auth is not None and got["BasicAuth"][0].auth[1] == "relay"
    assert got["BasicAuthRequireTLS"][0].tls
    assert got["BasicAuthRequireTLS"][0].auth[1] == "relay"
    assert got["ExchangeServer"][0].tls  # the handshake took the hub's certificate
    assert got["ExternalAuthoritative"][0].auth is None
