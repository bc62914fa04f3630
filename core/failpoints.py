"""Named failpoints: let a crash test kill the daemon at an exact step of a protocol.

``HUBPORT_FAILPOINTS="after_commit_before_unlink:kill:3,other:kill"`` makes the process
SIGKILL itself the 3rd time ``failpoint("after_commit_before_unlink")`` is reached (the 1st
time when no count is given). A kill, not an exception: nothing may run after it (no
``finally``, no flush), exactly as when the machine loses power or the OOM killer strikes.
Without the variable a failpoint costs one dictionary lookup.

The failpoints, in the order a message meets them:

* ``after_submit_commit``: a submission committed, not yet acknowledged to its source;
* ``after_receive_commit_before_reply``: SMTP DATA committed, the ``250`` not yet sent;
* ``after_claim_before_commit`` / ``after_commit_before_unlink``: a Pickup/Replay claim;
* ``during_startup_recovery``: re-processing a message that was in flight at a crash;
* ``after_intent_before_rename`` / ``after_rename_before_delivered``: a drop or Maildir write;
* ``after_send_before_commit``: the Send connector's next hop accepted, not yet committed;
* ``after_agent_before_commit``: a Delivery Agent connector delivered, not yet committed;
* ``after_delivery_commit``: delivery results and their tracking events committed;
* ``tracking_before_write`` / ``tracking_after_write``: copying committed tracking events
  to the log file.
"""

from __future__ import annotations

import os
import signal

ENV = "HUBPORT_FAILPOINTS"
ACTIONS = ("kill",)


def _parse(text: str) -> dict[str, tuple[str, int]]:
    """``name:action[:n]`` items separated by commas → {name: (action, n)}."""
    points: dict[str, tuple[str, int]] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, rest = item.partition(":")
        action, _, count = rest.partition(":")
        action = action or "kill"
        if action not in ACTIONS:
            raise ValueError(f"{ENV}: unknown action {action!r} in {item!r} (known: kill)")
        points[name] = (action, int(count) if count else 1)
    return points


_points = _parse(os.environ.get(ENV, ""))
_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Fire the action armed for ``name`` when its hit count is reached; else do nothing."""
    if not _points:
        return
    armed = _points.get(name)
    if armed is None:
        return
    hits = _hits[name] = _hits.get(name, 0) + 1
    if hits == armed[1]:
        os.kill(os.getpid(), signal.SIGKILL)


def arm(spec: str) -> None:
    """Replace the armed failpoints (for in-process tests); ``""`` disarms all."""
    global _points
    _points = _parse(spec)
    _hits.clear()
