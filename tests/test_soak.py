"""The crash soak in the suite: 20 SIGKILLs of the real daemon while mail flows through every
path (``tests/soak.py``; ``./dev soak --kills N`` runs longer ones).

The volume is kept small so the test takes well under a minute and a half on a busy 2-core
machine; the plan still lands every kind of kill (random moments, start-up, start-up
recovery, folder claims, drop/Maildir writes, outbound hand-offs, the commit after DATA).
``HUBPORT_SOAK_SEED`` replays another schedule.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from ledger import listing, message_id_of, split_message
from soak import DROP_FOLDER, Soak, run_soak

SEED = int(os.environ.get("HUBPORT_SOAK_SEED", "20260516"))
KILLS = 20
MESSAGES = 240


@pytest.mark.timeout(300)
def test_twenty_kills_lose_nothing_double_nothing_and_track_every_delivery(
        tmp_path: Path, figures: Callable[[str], None]) -> None:
    root = tmp_path / "soak"
    root.mkdir()
    # one process: the suite's time budget; tests/test_workers.py kills workers and
    # supervisors, and ``./dev soak`` (two workers by default) soaks both kinds
    soak = run_soak(root, kills=KILLS, seed=SEED, messages=MESSAGES, workers=1)
    ledger = soak.ledger
    figures(f"crash soak: seed={SEED} kills={ledger.kills} accepted={ledger.accepted} "
            f"copies={ledger.delivered_copies}/{ledger.expected_copies} "
            f"lost={len(ledger.lost)} dup={len(ledger.duplicated_acknowledged)} "
            f"dup-unseen={len(ledger.duplicated_250_unseen)} "
            f"dup-handoff={len(ledger.duplicated_handoff)} phantom={len(ledger.phantom)} "
            f"corrupt={len(ledger.corrupted)} untracked={len(ledger.untracked)} "
            f"slowest-recovery={ledger.slowest_recovery}s time={ledger.seconds}s "
            f"(kills {ledger.kill_phase_seconds}s, drain {ledger.drain_seconds}s)")
    assert ledger.ok, ledger.text()
    assert sum(ledger.kills_by_kind.values()) == KILLS, ledger.text()
    assert ledger.accepted == MESSAGES, ledger.text()  # every client got its 250 in the end
    assert ledger.delivered_copies == ledger.expected_copies > MESSAGES
    fired = [kind for kind in ledger.kills_by_kind if kind.startswith("failpoint")]
    assert len(fired) >= 3, ledger.text()  # the exact moments were hit, not only timing
    assert ledger.recoveries_measured > 0 and ledger.slowest_recovery is not None
    check_the_checker(root, soak)


def _by_message(files: list[Path], blank: bytes) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in files:
        head, _ = split_message(path.read_bytes(), blank)
        found.setdefault(message_id_of(head), []).append(path)
    return found


def check_the_checker(root: Path, soak: Soak) -> None:
    """Negative control: spoil the clean state once per category; the ledger must see each."""
    once = {m.message_id for m in soak.messages if m.submissions == 1}
    inbox = _by_message(listing(root / "var" / "mailboxes" / "Alice" / "new"), b"\n\n")
    single = sorted(mid for mid, paths in inbox.items() if mid in once and len(paths) == 1)
    assert len(single) >= 3, "too few messages to spoil"
    lost, doubled, untracked = single[:3]
    inbox[lost][0].unlink()
    copy = inbox[doubled][0]
    shutil.copyfile(copy, copy.with_name("copy-" + copy.name))
    drops = sorted(root.joinpath(*DROP_FOLDER).glob("*.eml"))
    drops[0].write_bytes(drops[0].read_bytes() + b"tampered\r\n")
    (root / "var" / "mailboxes" / "Alice" / "new" / "phantom.HUB01").write_bytes(
        b"Message-ID: <never-sent@soak.test>\n\nnobody sent this\n")
    bare = untracked.strip("<>")
    for log in (root / "var" / "logs" / "MessageTracking").glob("*.log"):
        lines = log.read_bytes().splitlines(keepends=True)
        log.write_bytes(b"".join(line for line in lines if not (
            bare.encode() in line and (b'"DELIVER"' in line or b'"SEND"' in line))))

    spoiled = soak.recount()
    assert not spoiled.ok
    assert any(entry.startswith(f"{lost} to maildir:Alice") for entry in spoiled.lost), \
        spoiled.text()
    assert any(entry.startswith(f"{doubled} to maildir:Alice")
               for entry in spoiled.duplicated_acknowledged), spoiled.text()
    assert len(spoiled.corrupted) == 1, spoiled.text()
    assert any("never-sent" in entry for entry in spoiled.phantom), spoiled.text()
    assert any(entry.startswith(untracked) for entry in spoiled.untracked), spoiled.text()
