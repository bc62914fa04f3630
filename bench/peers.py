"""Real peers for the SMTP benchmarks: smtp-source load, an smtp-sink, a private Postfix, hubport.

Everything listens on 127.0.0.1 ports of its own and is stopped by its PID; the system's
Postfix configuration is never touched (a private instance has its own config and queue
folder under the bench folder).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
POSTFIX = "/usr/sbin/postfix"
CHECKOUT = Path(__file__).resolve().parents[1]
HUBPORT = CHECKOUT / ".venv" / "bin" / "hubport"

POSTFIX_MAIN = """
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = bench.test
mydestination =
mynetworks = 127.0.0.0/8
maillog_file = /dev/stdout
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_process_limit = 100
message_size_limit = 67108864
{transport}
"""
DISCARD = ("relay_domains = contoso.test\ndefault_transport = discard:bench\n"
           "relay_transport = discard:bench")


def bench_org(port: int, *, mailbox: str | None = "Alice", relay: bool = False,
              server: str = "", connector: str = "", tail: str = "") -> str:
    """The organization every SMTP benchmark runs: contoso.test, HUB01 without protocol logs,
    one receive connector on ``port`` (anonymous, or ``relay``: a trusted server that may
    relay), plus ``server``/``connector`` fields and ``tail`` tables."""
    box = f'[[mailbox]]\nName = "{mailbox}"\n' if mailbox else ""
    who = ('AuthMechanism = ["ExternalAuthoritative"]\nPermissionGroups = ["ExchangeServers"]'
           if relay else 'PermissionGroups = ["AnonymousUsers"]')
    return f"""
[[accepted_domain]]
Name = "contoso.test"
DomainName = "contoso.test"
Default = true

{box}
[[transport_server]]
Name = "HUB01"
MessageTrackingLogMaxDirectorySize = "10GB"
ReceiveProtocolLogPath = ""
{server}

[[receive_connector]]
Name = "Default HUB01"
Bindings = ["127.0.0.1:{port}"]
{who}
MaxInboundConnectionPerSource = "unlimited"
{connector}
{tail}"""


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if not Path(t).exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: apt-get install postfix (see ./dev)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def smtp_source(port: int, messages: int, sessions: int, recipient: str, size: int = 2048,
                sender: str = "sender@example.org") -> float:
    """Postfix's load generator: ``sessions`` reused connections, ``size``-byte messages
    (2 KB unless told) from ``sender`` (also their From); the seconds it took."""
    started = time.monotonic()
    done = subprocess.run(
        [SMTP_SOURCE, "-d", "-s", str(sessions), "-m", str(messages), "-l", str(size),
         "-f", sender, "-t", recipient, f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=900, check=False)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {done.stderr.strip()[-500:]}")
    return elapsed


class Sink:
    """``smtp-sink`` appending every transaction to one dump file; counted by reading it.

    (Its ``-c`` counters are written through a buffer that is only flushed at exit.)
    """

    MARKER = b"X-Client-Addr: "

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder / f"sink-{self.port}"
        self.folder.mkdir()
        shutil.chown(self.folder, "nobody")  # smtp-sink writes as nobody
        self.dump = self.folder / "dump"
        self._seen = 0
        self._offset = 0
        self._tail = b""

    def count(self) -> int:
        """Transactions dumped so far (reads only what was appended since the last call)."""
        if not self.dump.exists():
            return 0
        with open(self.dump, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        # a marker split across two reads is found whole in tail + chunk; the tail is one
        # byte shorter than the marker, so no marker is ever counted twice
        data = self._tail + chunk
        self._seen += data.count(self.MARKER)
        self._tail = data[-(len(self.MARKER) - 1):]
        return self._seen

    def wait_for(self, total: int, timeout: float = 600.0) -> float:
        """Block until ``total`` messages arrived; the monotonic time they had."""
        deadline = time.monotonic() + timeout
        while self.count() < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sink got {self.count()} of {total} messages")
            time.sleep(0.02)
        return time.monotonic()


@contextmanager
def sink(folder: Path) -> Iterator[Sink]:
    peer = Sink(folder)
    process = subprocess.Popen([SMTP_SINK, "-u", "nobody", "-D", str(peer.dump),
                                f"127.0.0.1:{peer.port}", "256"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(peer.port)
        yield peer
    finally:
        process.terminate()
        process.wait(30)


def maildir_transport(mail: Path) -> str:
    """main.cf lines: virtual(8) delivers every contoso.test recipient to the Maildir
    ``mail/bob/`` as the user nobody (fsync'd, as Postfix always delivers)."""
    user = pwd.getpwnam("nobody")
    return (f"virtual_mailbox_limit = 0\nvirtual_mailbox_domains = contoso.test\n"
            f"virtual_mailbox_base = {mail}\nvirtual_mailbox_maps = static:bob/\n"
            f"virtual_uid_maps = static:{user.pw_uid}\nvirtual_gid_maps = static:{user.pw_gid}\n"
            "virtual_minimum_uid = 1\nvirtual_destination_concurrency_limit = 20\n")


@contextmanager
def postfix(root: Path, *, relayhost: int | None = None, maildir: Path | None = None
            ) -> Iterator[int]:
    """A private Postfix on its own port: discards, relays to ``[127.0.0.1]:relayhost``, or
    delivers to the Maildir ``maildir/bob/`` with virtual(8)."""
    shutil.rmtree(root, ignore_errors=True)
    for name in ("conf", "queue", "data"):
        (root / name).mkdir(parents=True)
    shutil.chown(root / "data", "postfix")
    port = free_port()
    master = Path("/usr/share/postfix/master.cf.dist").read_text().replace(
        "smtp      inet  n       -       y       -       -       smtpd",
        f"127.0.0.1:{port} inet n - n - - smtpd")
    (root / "conf" / "master.cf").write_text(master)
    if maildir is not None:
        maildir.mkdir(parents=True, exist_ok=True)
        shutil.chown(maildir, "nobody", "nogroup")
        transport = maildir_transport(maildir)
    elif relayhost is not None:
        transport = (f"relayhost = [127.0.0.1]:{relayhost}\n"
                     "smtp_destination_concurrency_limit = 20\n"
                     "default_destination_concurrency_limit = 20")
    else:
        transport = DISCARD
    (root / "conf" / "main.cf").write_text(POSTFIX_MAIN.format(root=root, transport=transport))
    with open(root.parent / f"{root.name}.log", "wb") as log:
        server = subprocess.Popen([POSTFIX, "-c", str(root / "conf"), "start-fg"], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_port(port)
            yield port
        finally:
            subprocess.run([POSTFIX, "-c", str(root / "conf"), "stop"], capture_output=True,
                           check=False)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


@contextmanager
def hubport(root: Path, org: str, port: int, workers: int | None = None,
            commands: Sequence[str] = ()) -> Iterator[subprocess.Popen[bytes]]:
    """The real daemon in a subprocess on ``root/org.toml``; its log beside ``root``.
    ``workers``: ``hubport run --workers`` (None: the daemon's default, the CPU count);
    ``commands``: cmdlet lines run on the organization before the daemon starts."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "org.toml").write_text(org)
    for line in commands:
        hubport_command(root, line)
    log_path = root.parent / f"{root.name}.log"  # outside the watched folder
    argv = [str(HUBPORT), "run", "--config", "org.toml"]
    if workers is not None:
        argv += ["--workers", str(workers)]
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(argv, cwd=root, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(port)
            wait_running(log_path, daemon)  # every worker serves, not only the first
            yield daemon
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)


def hubport_command(root: Path, *args: str) -> None:
    subprocess.run([str(HUBPORT), *args, "--config", "org.toml"], cwd=root, check=True,
                   capture_output=True)


def prepare_base(prefix: str) -> Path:
    """A bench folder Postfix's unprivileged daemons can reach."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    return base


# -- the hubport server's processes (a supervisor and its workers) ------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (a supervisor's workers)."""
    found = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        kids = [int(k) for k in children.read_text().split()]
    except OSError:
        kids = []
    for kid in kids:
        found += process_tree(kid)
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the server (``pid`` and its workers) has used so far."""
    total = 0.0
    for proc in process_tree(pid):
        try:
            fields = Path(f"/proc/{proc}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM summed over the server's processes, in KiB (the peak is the sum of
    each process's own peak: an upper bound of the server's peak)."""
    totals = {"VmRSS": 0, "VmHWM": 0}
    for proc in process_tree(pid):
        try:
            text = Path(f"/proc/{proc}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name in totals:
                totals[name] += int(value.split()[0])
    return totals


def queued_messages(root: Path) -> int:
    """Messages in every worker's queue database under ``root/var``."""
    import sqlite3
    from contextlib import closing

    total = 0
    for db in sorted((root / "var" / "queue").glob("mail*.que")):
        with closing(sqlite3.connect(db)) as conn:
            total += conn.execute("SELECT COUNT(*) FROM message").fetchone()[0]
    return total


def wait_running(log_path: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Until the server logs that every worker serves."""
    deadline = time.monotonic() + timeout
    while b"hubport running" not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"hubport did not start; see {log_path}")
        time.sleep(0.05)


# -- one process's memory, and the daemon's control commands (bench/large_message.py) ---------


def process_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` alone, in KiB: not of its children (a command delivery
    agent's program is a child of the worker, and its memory is not the worker's). Zeros
    once the process has gone."""
    found = {"VmRSS": 0, "VmHWM": 0}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in found:
            found[name] = int(value.split()[0])
    return found


def reset_peak(pid: int) -> bool:
    """Reset ``pid``'s VmHWM to its present VmRSS (``clear_refs`` value 5, Linux 4.0 and
    later), so that the peak read later is the peak since now, not since the process
    started; False when the file cannot be written (another user's process, an old kernel)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def hubport_output(root: Path, *args: str) -> str:
    """What ``hubport <args>`` prints for the daemon on ``root/org.toml`` (its output and
    errors, never raising): for a report of what a benchmark last saw."""
    try:
        done = subprocess.run([str(HUBPORT), *args, "--config", "org.toml"], cwd=root,
                              capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return f"hubport {' '.join(args)}: no answer within 60 s"
    return (done.stdout + done.stderr).strip()
