"""Real disk faults: full and read-only filesystems under the drop folder and the queue.

Each test mounts a small tmpfs (the tests run as root, as CI does) so the kernel itself
answers ENOSPC or EROFS; no system call is faked. Where mounting is not permitted the tests
are skipped: tests/test_drop.py and tests/test_folders.py cover the same paths by patching.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import drop_files, drop_in, events, maildir, message, wait_for

FAX = "IMCEAFAX-+2B15551234@contoso.test"


def _mount(point: Path, size: str) -> None:
    point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def _remount(point: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(point)], check=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[callable]:
    mounted: list[Path] = []

    def mount(relative: str, size: str = "512k") -> Path:
        point = tmp_path / relative
        _mount(point, size)
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(folder: Path) -> Path:
    """Fill a filesystem to the last byte; returns the filler file (delete it to free)."""
    filler = folder / ".filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


async def test_full_drop_folder_defers_then_delivers(hub_factory, tmpfs) -> None:
    drop = tmpfs("drop/Fax Gateway")
    filler = fill(drop)
    async with hub_factory() as hub:
        drop_in(hub.pickup, "f.eml", message(to=FAX, body="x" * 5000 + "\n"))
        defer = await wait_for(lambda: events(hub.root, event_id="DEFER"))
        assert "4.3.1" in defer[0]["recipient-status"][0]
        assert not drop_files(drop)
        assert not [p for p in drop.iterdir() if p.name.endswith(".tmp")]  # partial temp removed
        filler.unlink()
        files = await wait_for(lambda: drop_files(drop), timeout=15)
        assert len(files) == 1 and b"x" * 5000 in files[0].read_bytes()


async def test_read_only_drop_folder_defers_then_delivers(hub_factory, tmpfs) -> None:
    drop = tmpfs("drop/Fax Gateway")
    _remount(drop, "ro")
    async with hub_factory() as hub:
        drop_in(hub.pickup, "f.eml", message(to=FAX))
        defer = await wait_for(lambda: events(hub.root, event_id="DEFER"))
        assert "not writable" in defer[0]["recipient-status"][0]
        _remount(drop, "rw")
        files = await wait_for(lambda: drop_files(drop), timeout=15)
        assert len(files) == 1


async def test_full_queue_disk_keeps_the_pickup_file_then_delivers(hub_factory, tmpfs) -> None:
    state = tmpfs("var", size="16m")
    async with hub_factory() as hub:
        drop_in(hub.pickup, "first.eml", message(subject="first"))
        await wait_for(lambda: maildir(hub.root, "Bob"))
        filler = fill(state)
        body = "y" * 300_000 + "\n"  # more than any free page the database still holds
        drop_in(hub.pickup, "second.eml", message(subject="second", body=body))
        # the commit fails: the file must stay in the folder under its own name
        await wait_for(lambda: not os.path.exists(hub.pickup / ".work")
                       or not any((hub.pickup / ".work").iterdir()), timeout=10)
        for _ in range(20):
            assert (hub.pickup / "second.eml").exists() or len(maildir(hub.root, "Bob")) == 2
            assert not list(hub.pickup.glob("*.bad"))
            await wait_for(lambda: True, interval=0.1)
        assert (hub.pickup / "second.eml").exists(), "acknowledged without a durable commit"
        filler.unlink()
        await wait_for(lambda: len(maildir(hub.root, "Bob")) == 2, timeout=20)
        assert not (hub.pickup / "second.eml").exists()
