"""Real etcd members for the organization-store tests: Debian's ``etcd`` binary on loopback
ports, one member or a three-member cluster, each killable with SIGKILL and restartable on
its own data folder."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hubport.core.etcd import Endpoint, EtcdClient, EtcdError
from send_peers import free_port

ETCD = shutil.which("etcd")


class Member:
    def __init__(self, name: str, folder: Path, cluster: str, client: int, peer: int,
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        self.name, self.folder, self.cluster = name, folder, cluster
        self.client_port, self.peer_port = client, peer
        #: (CA, certificate, key): clients speak TLS and must present a certificate
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        assert ETCD is not None
        log = open(self.folder / f"{self.name}.log", "ab")
        scheme = "https" if self.tls else "http"
        secure = [] if self.tls is None else [
            "--trusted-ca-file", str(self.tls[0]), "--cert-file", str(self.tls[1]),
            "--key-file", str(self.tls[2]), "--client-cert-auth"]
        self.proc = subprocess.Popen([
            ETCD, "--name", self.name, "--data-dir", str(self.folder / self.name), *secure,
            "--listen-client-urls", f"{scheme}://{self.endpoint}",
            "--advertise-client-urls", f"{scheme}://{self.endpoint}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", self.cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", "hubport-test"],
            stdout=log, stderr=log, start_new_session=True)
        log.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class Cluster:
    def __init__(self, members: list[Member]) -> None:
        self.members = members

    def url(self, prefix: str) -> str:
        return f"etcd://{','.join(m.endpoint for m in self.members)}/{prefix}"

    def wait_healthy(self, timeout: float = 30.0) -> None:
        context = None
        tls = self.members[0].tls
        if tls is not None:
            context = ssl.create_default_context(cafile=str(tls[0]))
            context.load_cert_chain(str(tls[1]), str(tls[2]))
        client = EtcdClient([Endpoint("127.0.0.1", m.client_port) for m in self.members
                             if m.proc is not None and m.proc.poll() is None], context)
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                asyncio.run(client.put(b"/health", b"ok"))
                return
            except EtcdError as exc:
                last = exc
                time.sleep(0.2)
        raise AssertionError(f"etcd did not become writable within {timeout}s: {last}")

    def kill_all(self) -> None:
        for m in self.members:
            m.kill()

    def start_all(self) -> None:
        for m in self.members:
            if m.proc is None or m.proc.poll() is not None:
                m.start()


@contextmanager
def etcd_cluster(folder: Path, size: int = 1,
                 tls: tuple[Path, Path, Path] | None = None) -> Iterator[Cluster]:
    if ETCD is None:
        pytest.fail("etcd is not installed (Debian package etcd-server; ./dev test installs it)")
    ports = [(free_port(), free_port()) for _ in range(size)]
    names = [f"m{i + 1}" for i in range(size)]
    initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, (_c, p) in zip(names, ports))
    cluster = Cluster([Member(n, folder, initial, c, p, tls)
                       for n, (c, p) in zip(names, ports)])
    try:
        cluster.start_all()
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.kill_all()
