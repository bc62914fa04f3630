"""Tests for mailbox passwords: scrypt hashes, login names, the password file and the CLI."""

from __future__ import annotations

import re
import stat
import subprocess
from pathlib import Path

import pytest

from hubport.core import credentials
from hubport.core.config import Mailbox, Organization
from hubport.core.credentials import (
    PasswordStore,
    hash_password,
    mailbox_for_login,
    verify_password,
)
from hubport.core.daemon import load, make_hooks
from support import write_org

ROOT = Path(__file__).resolve().parents[1]
HUBPORT = ROOT / ".venv" / "bin" / "hubport"


@pytest.fixture
def fast_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cheap work factor for tests that hash many times (entries carry their own cost)."""
    monkeypatch.setattr(credentials, "LOG_N", 4)


@pytest.fixture
def org(tmp_path: Path) -> Organization:
    config = write_org(tmp_path)
    return load(config, make_hooks(config))


def mailbox(org: Organization, name: str) -> Mailbox:
    found = mailbox_for_login(org, name)
    assert found is not None
    return found


# ---- hashing -------------------------------------------------------------------------------


def test_hash_format_and_verify() -> None:
    encoded = hash_password("correct horse")
    assert re.fullmatch(r"\$scrypt\$ln=15,r=8,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}", encoded)
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct horsE", encoded)
    assert not verify_password("", encoded)


def test_salts_differ_and_unicode_works(fast_scrypt: None) -> None:
    a, b = hash_password("pässwörd €"), hash_password("pässwörd €")
    assert a != b
    assert verify_password("pässwörd €", a) and verify_password("pässwörd €", b)
    assert verify_password("\udcff lone", hash_password("\udcff lone"))


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "plain",
        "$scrypt$",
        "$bcrypt$ln=4,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "$scrypt$ln=40,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "$scrypt$ln=4,r=99,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "$scrypt$ln=0,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "$scrypt$ln=4,r=8,p=1$A$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  # bad base64
        "$scrypt$ln=4,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAA",  # hash too short
        "$scrypt$ln=4,r=8,p=1$AAAA!AAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ],
)
def test_malformed_entries_never_match(entry: str) -> None:
    assert verify_password("", entry) is False
    assert verify_password("AAAA", entry) is False


def test_tampered_hash_fails(fast_scrypt: None) -> None:
    encoded = hash_password("pw")
    head, digest = encoded.rsplit("$", 1)
    flipped = ("B" if digest[0] == "A" else "A") + digest[1:]
    assert verify_password("pw", encoded)
    assert not verify_password("pw", f"{head}${flipped}")


# ---- login names ---------------------------------------------------------------------------


def test_mailbox_for_login(org: Organization) -> None:
    alice = mailbox(org, "Alice")
    for login in ("alice", "ALICE", "alice@contoso.test", "Alice.Smith@Contoso.TEST"):
        assert mailbox_for_login(org, login) is alice
    assert mailbox_for_login(org, "bob@contoso.test") is mailbox(org, "bob")
    for login in ("", "  ", "carol", "faxreception@contoso.test", "staff", "alice@fabrikam.test"):
        assert mailbox_for_login(org, login) is None


# ---- the password file ---------------------------------------------------------------------


async def test_missing_file_means_nobody_logs_in(tmp_path: Path, org: Organization) -> None:
    store = PasswordStore(tmp_path / "auth" / "passwords")
    assert await store.verify(mailbox(org, "alice"), "") is False
    assert await store.verify(mailbox(org, "alice"), "anything") is False


async def test_set_and_verify(tmp_path: Path, org: Organization, fast_scrypt: None) -> None:
    path = tmp_path / "auth" / "passwords"
    store = PasswordStore(path)
    alice, bob = mailbox(org, "alice"), mailbox(org, "bob")
    store.set_password(alice, "alice-pw")
    store.set_password(bob, "bob-pw")
    assert await store.verify(alice, "alice-pw")
    assert not await store.verify(alice, "bob-pw")
    assert await store.verify(bob, "bob-pw")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    lines = path.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["alice", "bob"]
    assert "alice-pw" not in path.read_text()
    store.set_password(alice, "new-pw")  # replaces, keeps the others
    assert [line.split(":")[0] for line in path.read_text().splitlines()] == ["bob", "alice"]
    assert await store.verify(alice, "new-pw") and not await store.verify(alice, "alice-pw")
    assert sorted(p.name for p in path.parent.iterdir()) == ["passwords"]  # no temp files


async def test_reloads_when_the_file_changes(
    tmp_path: Path, org: Organization, fast_scrypt: None
) -> None:
    path = tmp_path / "passwords"
    reader = PasswordStore(path)  # a running daemon
    alice = mailbox(org, "alice")
    assert not await reader.verify(alice, "one")
    PasswordStore(path).set_password(alice, "one")  # the CLI, another process
    assert await reader.verify(alice, "one")
    PasswordStore(path).set_password(alice, "two")
    assert await reader.verify(alice, "two") and not await reader.verify(alice, "one")
    # Hand-edited file: comments and junk are ignored, aliases compare case-insensitively.
    path.write_text(f"# comment\njunk\nALICE:{hash_password('three')}\n")
    assert await reader.verify(alice, "three")
    path.unlink()
    assert not await reader.verify(alice, "three")


async def test_a_broken_entry_locks_out_only_its_mailbox(
    tmp_path: Path, org: Organization, fast_scrypt: None
) -> None:
    path = tmp_path / "passwords"
    path.write_text(f"alice:$scrypt$garbage\nbob:{hash_password('bob-pw')}\n")
    store = PasswordStore(path)
    assert not await store.verify(mailbox(org, "alice"), "")
    assert await store.verify(mailbox(org, "bob"), "bob-pw")


# ---- configuration -------------------------------------------------------------------------


def test_password_file_path_config(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    default = write_org(tmp_path / "a")
    server = load(default, make_hooks(default)).servers[0]
    assert server.password_file_path == tmp_path / "a" / "var" / "auth" / "passwords"
    custom = write_org(tmp_path / "b", server_extra='PasswordFilePath = "secrets/pw"')
    server = load(custom, make_hooks(custom)).servers[0]
    assert server.password_file_path == tmp_path / "b" / "secrets" / "pw"


# ---- the CLI -------------------------------------------------------------------------------


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HUBPORT), "set-password", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.skipif(not HUBPORT.exists(), reason="the hubport console script is not installed")
async def test_cli_set_password(tmp_path: Path) -> None:
    config = write_org(tmp_path)
    path = tmp_path / "var" / "auth" / "passwords"
    done = run_cli("Alice.Smith@contoso.test", "--config", str(config), "--password-stdin",
                   stdin="s3cret pw\n")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "s3cret" not in done.stdout + done.stderr
    assert "Alice" in done.stdout
    org = load(config, make_hooks(config))
    store = PasswordStore(org.servers[0].password_file_path)
    assert path == org.servers[0].password_file_path
    assert await store.verify(mailbox(org, "alice"), "s3cret pw")
    assert not await store.verify(mailbox(org, "alice"), "s3cret pw\n")

    unknown = run_cli("carol", "--config", str(config), "--password-stdin", stdin="x\n")
    assert unknown.returncode == 1 and "no mailbox 'carol'" in unknown.stderr
    empty = run_cli("bob", "--config", str(config), "--server", "HUB01", "--password-stdin",
                    stdin="\n")  # fmt: skip
    assert empty.returncode == 1 and "must not be empty" in empty.stderr
    assert [line.split(":")[0] for line in path.read_text().splitlines()] == ["alice"]


def test_cli_mismatch_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The interactive path (getpass) cannot run in a subprocess without a terminal."""
    from hubport.core import cli

    monkeypatch.setattr("hubport.core.logsetup.configure", lambda *_a, **_k: None)
    config = write_org(tmp_path)
    answers = iter(["first", "second"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert cli.main(["set-password", "alice", "--config", str(config)]) == 1
    assert not (tmp_path / "var" / "auth" / "passwords").exists()
    answers = iter(["same", "same"])
    monkeypatch.setattr(credentials, "LOG_N", 4)
    assert cli.main(["set-password", "alice", "--config", str(config)]) == 0
    assert (tmp_path / "var" / "auth" / "passwords").exists()
