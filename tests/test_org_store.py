"""The organization in etcd (core/org_store.py, core/etcd.py; docs/deployment.md, "The
organization in etcd"), with real etcd members on loopback ports.

Two hubs, each started in its own folder as on its own machine, read one organization from
a three-member cluster. Mailboxes and a Send connector added through the store reach both
without a restart and mail flows through them; with one member killed the store still
takes changes; with every member killed mail keeps flowing and a hub restarted meanwhile
starts from its cache; once the store is back, a change is applied. Also: the push/pull
round trip is byte-stable, and every bad input is a clear error naming what is wrong.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_process import DaemonPool, daemon_pool, hubport
from etcd_peer import etcd_cluster
from hubport.core.org_store import OrganizationStore
from send_peers import ScriptedSink
from smtp_support import free_port, send_one
from support import wait_for_sync

pytestmark = pytest.mark.timeout(300)


def organization(ports: dict[str, int], mailboxes: dict[str, str], sink: int | None = None
                 ) -> str:
    text = """
[[accepted_domain]]
Name = "contoso.test"
DomainName = "contoso.test"
DomainType = "Authoritative"
Default = true
"""
    for server in ("HUB01", "HUB02"):
        text += f"""
[[transport_server]]
Name = "{server}"
Fqdn = "{server.lower()}.contoso.test"
MessageRetryInterval = "1s"
QueueGlitchRetryInterval = "1s"
TransientFailureRetryInterval = "1s"
OutboundConnectionFailureRetryInterval = "1s"

[[receive_connector]]
Name = "Default {server}"
Server = "{server}"
Bindings = ["127.0.0.1:{ports[server]}"]
AuthMechanism = ["Tls", "ExchangeServer"]
PermissionGroups = ["AnonymousUsers", "ExchangeServers"]
"""
    for name, server in mailboxes.items():
        text += f"""
[[mailbox]]
Name = "{name}"
PrimarySmtpAddress = "{name.lower()}@contoso.test"
Server = "{server}"
"""
    if sink is not None:
        text += f"""
[[accepted_domain]]
Name = "example.net"
DomainName = "example.net"
DomainType = "InternalRelay"

[[send_connector]]
Name = "Out"
AddressSpaces = ["example.net"]
SourceTransportServers = ["HUB01", "HUB02"]
SmartHosts = ["[127.0.0.1]"]
Port = {sink}
"""
    return text


def push(root: Path, url: str, text: str) -> str:
    path = root / "push.toml"
    path.write_text(text)
    done = hubport("push-organization", str(path), "--config", url, cwd=root)
    assert done.returncode == 0, done.stderr
    return done.stdout


def push_and_converge(root: Path, url: str, text: str, generation: str) -> None:
    """Push, then wait until both hubs report running the new generation."""
    push(root, url, text)
    wait_for_sync(lambda: set(generations(root, url).values()) == {generation}, 90,
                  what=f"both hubs on generation {generation}",
                  describe=lambda: generations(root, url))


def inbox(root: Path, name: str) -> list[Path]:
    folder = root / "var" / "mailboxes" / name / "new"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def generations(root: Path, url: str) -> dict[str, str | None]:
    done = hubport("get-transportserver", "--config", url, "--json", cwd=root)
    if done.returncode != 0:
        return {"error": done.stderr}
    return {r["name"]: r["generation"] for r in json.loads(done.stdout)}


def test_push_and_pull_round_trip_byte_stable_and_bad_inputs_are_named(tmp_path: Path) -> None:
    ports = {"HUB01": free_port(), "HUB02": free_port()}
    with etcd_cluster(tmp_path) as cluster:
        url = cluster.url("contoso")
        empty = hubport("pull-organization", "--config", url, cwd=tmp_path)
        assert empty.returncode == 1 and "no organization here" in empty.stderr, empty.stderr

        push(tmp_path, url, organization(ports, {"Alice": "HUB01"}))
        first = hubport("pull-organization", "--config", url, cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        push(tmp_path, url, first.stdout)
        second = hubport("pull-organization", "--config", url, cwd=tmp_path)
        assert second.stdout == first.stdout  # byte-stable
        assert 'Name = "Alice"' in first.stdout

        # an invalid file is refused with the errors test-config gives, and nothing changes
        bad = tmp_path / "bad.toml"
        bad.write_text(organization(ports, {"Alice": "HUB09"}))
        done = hubport("push-organization", str(bad), "--config", url, cwd=tmp_path)
        assert done.returncode == 2 and 'mailbox "Alice": Server' in done.stderr, done.stderr
        assert hubport("pull-organization", "--config", url, cwd=tmp_path).stdout == \
            first.stdout

        # a value written by hand: refused, with its key named
        store = OrganizationStore.from_url(url)
        generation, _ = asyncio.run(store.current())
        assert generation is not None
        key = store.key(generation, "mailbox", "Zed")
        asyncio.run(store.client.put(key, b'Name = "Zed"\nServer = "HUB07"\n'))
        done = hubport("test-config", "--config", url, cwd=tmp_path)
        assert done.returncode == 2, done.stdout
        assert f"key /contoso/{generation}/mailbox/Zed" in done.stderr, done.stderr
        assert "Server" in done.stderr
        asyncio.run(store.client.put(key, b"Name = = broken"))
        done = hubport("test-config", "--config", url, cwd=tmp_path)
        assert done.returncode == 2 and f"/contoso/{generation}/mailbox/Zed" in done.stderr
        assert "not a TOML table" in done.stderr, done.stderr

        # a misspelt URL, and a store nobody answers at: each names what is wrong
        done = hubport("test-config", "--config", "etcd://127.0.0.1/contoso", cwd=tmp_path)
        assert done.returncode == 2 and "is not host:port" in done.stderr, done.stderr
        dead = f"etcd://127.0.0.1:{free_port()}/contoso"
        done = hubport("test-config", "--config", dead, cwd=tmp_path)
        assert done.returncode == 2 and "no endpoint answers" in done.stderr, done.stderr


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[DaemonPool]:
    with daemon_pool(tmp_path) as daemons:
        yield daemons


def test_two_hubs_follow_the_store_live_and_keep_delivering_without_it(
        tmp_path: Path, pool: DaemonPool) -> None:
    ports = {"HUB01": free_port(), "HUB02": free_port()}
    machine = {"HUB01": tmp_path / "a", "HUB02": tmp_path / "b"}
    for folder in machine.values():
        folder.mkdir()
    with etcd_cluster(tmp_path, size=3) as cluster, ScriptedSink() as sink:
        url = cluster.url("contoso")
        boxes = {"Alice": "HUB01"}
        push(tmp_path, url, organization(ports, boxes))
        # HUB01 starts first: it makes the organization's CA and publishes its certificate
        hubs = {"HUB01": pool.start("--server", "HUB01", config=url,  # type: ignore[arg-type]
                                    cwd=machine["HUB01"])}
        hubs["HUB01"].wait_ready(60)
        store = OrganizationStore.from_url(url)
        published = asyncio.run(store.client.range(store.key("ca.crt")))[0]
        assert published and published[0].value == \
            (machine["HUB01"] / "var" / "ca" / "ca.crt").read_bytes()
        # HUB02, on another machine, gets the CA certificate from the store but no key: it
        # says what to run where the key is, and starts once given its certificate
        lonely = pool.start("--server", "HUB02", config=url,  # type: ignore[arg-type]
                            cwd=machine["HUB02"])
        assert lonely.wait(60) == 5
        assert "hubport new-servercertificate HUB02" in lonely.log_text()
        assert not (machine["HUB02"] / "var" / "ca" / "ca.key").exists()
        done = hubport("new-servercertificate", "HUB02", "--config", url, "--out",
                       str(tmp_path / "for-hub02"), cwd=machine["HUB01"])
        assert done.returncode == 0, done.stderr
        internal = machine["HUB02"] / "var" / "certs" / "internal"
        internal.mkdir(parents=True, exist_ok=True)
        for suffix in ("crt", "key"):
            shutil.copy(tmp_path / "for-hub02" / f"hub02.contoso.test.{suffix}", internal)
        hubs["HUB02"] = pool.start("--server", "HUB02", config=url,  # type: ignore[arg-type]
                                   cwd=machine["HUB02"])
        hubs["HUB02"].wait_ready(60)
        # the hubs trust each other: Alice's mail, given to HUB02, is relayed to HUB01
        asyncio.run(send_one(ports["HUB02"], "alice@contoso.test", "across machines"))
        mail = wait_for_sync(lambda: inbox(machine["HUB01"], "Alice"), 60,
                             what="Alice's mail relayed from HUB02")
        assert b"by hub02.contoso.test" in mail[0].read_bytes()

        # a mailbox on HUB02 and a Send connector on both, through the store: no restart
        boxes["Bob"] = "HUB02"
        push_and_converge(tmp_path, url, organization(ports, boxes, sink.port), "00000002")
        asyncio.run(send_one(ports["HUB02"], "bob@contoso.test", "through the store"))
        asyncio.run(send_one(ports["HUB01"], "ann@example.net", "out of HUB01"))
        asyncio.run(send_one(ports["HUB02"], "ann@example.net", "out of HUB02"))
        wait_for_sync(lambda: inbox(machine["HUB02"], "Bob"), 60, what="Bob's mail")
        wait_for_sync(lambda: len(sink.received) >= 2, 60, what="both hubs' connector mail")

        # a bad value written by hand: each hub refuses it, names the key, keeps running
        bad = store.key("00000002", "mailbox", "Bob")
        good = asyncio.run(store.client.range(bad))[0][0].value
        asyncio.run(store.client.put(bad, b'Name = "Bob"\nServer = "HUB07"\n'))
        for hub in hubs.values():
            wait_for_sync(lambda hub=hub: "/contoso/00000002/mailbox/Bob" in hub.log_text()
                          and "configuration change refused" in hub.log_text(), 60,
                          what="the bad value refused, its key named")
        asyncio.run(send_one(ports["HUB02"], "bob@contoso.test", "bad value refused"))
        wait_for_sync(lambda: len(inbox(machine["HUB02"], "Bob")) >= 2, 60,
                      what="Bob's mail while the bad value is in the store")
        asyncio.run(store.client.put(bad, good))

        # one member of three dies: the store still takes a change, both hubs apply it
        cluster.members[0].kill()
        boxes["Carol"] = "HUB01"
        push_and_converge(tmp_path, url, organization(ports, boxes, sink.port), "00000003")
        asyncio.run(send_one(ports["HUB01"], "carol@contoso.test", "one member down"))
        wait_for_sync(lambda: inbox(machine["HUB01"], "Carol"), 60, what="Carol's mail")

        # every member dies: mail keeps flowing on the organization in force
        cluster.kill_all()
        asyncio.run(send_one(ports["HUB02"], "bob@contoso.test", "store away"))
        asyncio.run(send_one(ports["HUB01"], "ann@example.net", "store away"))
        wait_for_sync(lambda: len(inbox(machine["HUB02"], "Bob")) >= 3, 60,
                      what="Bob's mail with the store away")
        wait_for_sync(lambda: len(sink.received) >= 3, 60, what="connector mail, store away")
        # HUB02 restarted meanwhile starts from its cache, and says so
        hubs["HUB02"].signal(signal.SIGTERM)
        assert hubs["HUB02"].wait(60) == 0
        hubs["HUB02"] = pool.start("--server", "HUB02", config=url,  # type: ignore[arg-type]
                                   cwd=machine["HUB02"])
        hubs["HUB02"].wait_ready(60)
        assert "starting from the cached organization" in hubs["HUB02"].log_text()
        asyncio.run(send_one(ports["HUB02"], "bob@contoso.test", "from the cache"))
        wait_for_sync(lambda: len(inbox(machine["HUB02"], "Bob")) >= 4, 60,
                      what="Bob's mail on the cached organization")

        # the store comes back; a change made now reaches both hubs
        cluster.start_all()
        cluster.wait_healthy()
        boxes["Dan"] = "HUB02"
        push_and_converge(tmp_path, url, organization(ports, boxes, sink.port), "00000004")
        asyncio.run(send_one(ports["HUB02"], "dan@contoso.test", "store back"))
        wait_for_sync(lambda: inbox(machine["HUB02"], "Dan"), 60, what="Dan's mail")

        # nothing lost, nothing doubled
        assert [len(inbox(machine["HUB02"], "Bob")), len(inbox(machine["HUB01"], "Carol")),
                len(inbox(machine["HUB02"], "Dan"))] == [4, 1, 1]
        subjects = sorted(r.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0]
                          for r in sink.received)
        assert subjects == [b"out of HUB01", b"out of HUB02", b"store away"], subjects


def test_object_changes_are_validated_together_and_never_combine_into_an_invalid_one(
        tmp_path: Path) -> None:
    """Each change validates the whole organization and applies only if nothing changed
    since it read it; a change that lost the race is validated again on top of the other."""
    import threading
    import time

    from hubport.core.config import parse_organization
    from hubport.core.config_fields import ConfigError
    from hubport.core.hooks import Hooks

    types = Hooks(entry_points=False).registry.connector_types
    ports = {"HUB01": free_port(), "HUB02": free_port()}
    with etcd_cluster(tmp_path) as cluster:
        url = cluster.url("contoso")
        push(tmp_path, url, organization(ports, {"Alice": "HUB01"}))
        store = OrganizationStore.from_url(url)

        def validate(text: str) -> None:
            time.sleep(0.5)  # both changes read the organization before either commits
            parse_organization(text, source="test", base_dir=tmp_path, connector_types=types)

        def run(edits: dict, outcome: dict, key: str) -> None:  # type: ignore[type-arg]
            try:
                outcome[key] = asyncio.run(store.change(edits, validate))
            except ConfigError as exc:
                outcome[key] = exc

        def race(a: dict, b: dict) -> dict:  # type: ignore[type-arg]
            outcome: dict[str, object] = {}
            threads = [threading.Thread(target=run, args=(edits, outcome, key))
                       for key, edits in (("a", a), ("b", b))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            return outcome

        # two administrators, two different objects: both changes land
        outcome = race({("mailbox", "Xena"): {"Server": "HUB01"}},
                       {("mailbox", "Yuri"): {"Server": "HUB02"}})
        assert all(isinstance(v, str) for v in outcome.values()), outcome
        text, _, _ = asyncio.run(store.read())
        assert 'Name = "Xena"' in text and 'Name = "Yuri"' in text

        # each valid alone, invalid together: HUB02 removed while Zoe is homed on it
        hub02 = {k: v for k, v in tomllib_table(text, "transport_server", "HUB02").items()}
        assert hub02
        outcome = race({("mailbox", "Yuri"): None, ("transport_server", "HUB02"): None},
                       {("mailbox", "Zoe"): {"Server": "HUB02"}})
        refused = [v for v in outcome.values() if isinstance(v, ConfigError)]
        assert len(refused) == 1, outcome
        text, _, _ = asyncio.run(store.read())
        parse_organization(text, source="final", base_dir=tmp_path, connector_types=types)
        assert ('Name = "Zoe"' in text) != ('Name = "HUB02"' not in text)


def tomllib_table(text: str, section: str, name: str) -> dict[str, object]:
    import tomllib

    for table in tomllib.loads(text).get(section, []):
        if table.get("Name") == name:
            return dict(table)
    return {}


def test_etcd_users_and_secrets_that_stay_on_their_machines(tmp_path: Path) -> None:
    """With etcd's authentication on, the hubs log in with a user and a password file (a
    wrong password is a clear error); the organization names secret files, never secrets,
    and export-secrets gathers what a new hub needs from this machine."""
    import os
    import subprocess

    ports = {"HUB01": free_port(), "HUB02": free_port()}
    with etcd_cluster(tmp_path) as cluster:
        endpoint = cluster.members[0].endpoint
        for command in (["user", "add", "root:hubport-root-pw"], ["auth", "enable"]):
            done = subprocess.run(["etcdctl", "--endpoints", endpoint, *command],
                                  capture_output=True, text=True, timeout=30,
                                  env={**os.environ, "ETCDCTL_API": "3"})
            assert done.returncode == 0, done.stderr
        (tmp_path / "etcd.pw").write_text("hubport-root-pw\n")
        (tmp_path / "wrong.pw").write_text("guess\n")
        url = cluster.url("contoso") + "?user=root&password-file=etcd.pw"
        text = organization(ports, {"Alice": "HUB01"}) + """
[[send_connector]]
Name = "Relay"
AddressSpaces = ["*"]
SourceTransportServers = ["HUB02"]
SmartHosts = ["[127.0.0.1]"]
AuthenticationCredential = { UserName = "relay", PasswordFile = "relay.pw" }
"""
        (tmp_path / "relay.pw").write_text("relay-s3cret\n")
        push(tmp_path, url, text)
        pulled = hubport("pull-organization", "--config", url, cwd=tmp_path)
        assert pulled.returncode == 0, pulled.stderr
        assert "relay.pw" in pulled.stdout and "relay-s3cret" not in pulled.stdout

        wrong = cluster.url("contoso") + "?user=root&password-file=wrong.pw"
        done = hubport("pull-organization", "--config", wrong, cwd=tmp_path)
        assert done.returncode == 1 and "user 'root' cannot log in" in done.stderr, \
            done.stderr
        anonymous = hubport("pull-organization", "--config", cluster.url("contoso"),
                            cwd=tmp_path)
        assert anonymous.returncode == 1 and anonymous.stderr.startswith("hubport: etcd"), \
            anonymous.stderr

        out = tmp_path / "for-hub02"
        done = hubport("export-secrets", "HUB02", "--config", url, "--out", str(out),
                       cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        manifest = dict(line.split("\t") for line in
                        (out / "MANIFEST").read_text().splitlines())
        assert any(dest.endswith("relay.pw") for dest in manifest.values()), manifest
        copies = [out / name for name, dest in manifest.items() if dest.endswith("relay.pw")]
        assert copies[0].read_text() == "relay-s3cret\n"
        assert all((out / name).stat().st_mode & 0o077 == 0 for name in manifest)
        assert "var/auth/passwords is not on this machine" in done.stderr  # none made yet


def test_the_store_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    """etcds:// with the members' CA and a client certificate (etcd --client-cert-auth);
    a client without a certificate is refused with a clear error."""
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("hubport-hub")
    files = {name: tmp_path / f"{name}.pem" for name in
             ("ca", "server", "server-key", "client", "client-key")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["server"]))
    server.private_key_pem.write_to_path(str(files["server-key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client"]))
    client.private_key_pem.write_to_path(str(files["client-key"]))
    ports = {"HUB01": free_port(), "HUB02": free_port()}
    with etcd_cluster(tmp_path, tls=(files["ca"], files["server"], files["server-key"])) \
            as cluster:
        base = cluster.url("contoso").replace("etcd://", "etcds://")
        url = f"{base}?ca={files['ca']}&cert={files['client']}&key={files['client-key']}"
        push(tmp_path, url, organization(ports, {"Alice": "HUB01"}))
        done = hubport("pull-organization", "--config", url, cwd=tmp_path)
        assert done.returncode == 0 and 'Name = "Alice"' in done.stdout, done.stderr
        anonymous = hubport("pull-organization", "--config", f"{base}?ca={files['ca']}",
                            cwd=tmp_path)
        assert anonymous.returncode == 1 and "hubport: etcd" in anonymous.stderr, \
            anonymous.stderr
        assert "Traceback" not in anonymous.stderr


def test_a_new_hubs_certificate_comes_from_the_ca_beside_the_hub_the_command_runs_with(
        tmp_path: Path) -> None:
    """With the organization in a store, the CA lives in the first hub's state folder:
    new-servercertificate HUB02 --server HUB01 issues from there, whatever HUB02's own
    StateDirectory is."""
    from hubport.core.internal_tls import CertificateAuthority

    ports = {"HUB01": free_port(), "HUB02": free_port()}
    text = organization(ports, {"Alice": "HUB01"})
    text = text.replace('Name = "HUB01"\n', 'Name = "HUB01"\nStateDirectory = "var1"\n', 1)
    text = text.replace('Name = "HUB02"\n', 'Name = "HUB02"\nStateDirectory = "var2"\n', 1)
    with etcd_cluster(tmp_path) as cluster:
        url = cluster.url("contoso")
        push(tmp_path, url, text)
        CertificateAuthority(tmp_path / "var1" / "ca").ensure("Contoso")
        done = hubport("new-servercertificate", "HUB02", "--config", url, "--server", "HUB01",
                       "--out", str(tmp_path / "out"), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "out" / "hub02.contoso.test.crt").exists()
        assert not (tmp_path / "var2" / "ca").exists()
