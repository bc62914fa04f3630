"""What the scenario tests share: cmdlet lines run as an administrator types them, in a
folder whose daemon runs the embedded default (./hubport.toml once a cmdlet writes it)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from daemon_process import hubport
from send_peers import free_port

#: quick retries for the tests; an administrator keeps the defaults
QUICK_RETRIES = ("Set-TransportServer HUB01 -QueueGlitchRetryInterval 00:00:01"
                 " -TransientFailureRetryInterval 00:00:01"
                 " -OutboundConnectionFailureRetryInterval 00:00:01")


def run(home: Path, line: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """One cmdlet line in ``home``; it must succeed."""
    done = hubport(line, *extra, cwd=home)
    assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
    return done


def call(home: Path, line: str, *extra: str) -> tuple[int, str, str]:
    """One command line through ``hubport``'s own ``main`` in this process, in ``home``
    (the same code as the command, without a Python start per line): its exit status,
    output and error output."""
    import contextlib
    import io
    import os

    from hubport.core.cli import main

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(home)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main([line, *extra])
    finally:
        os.chdir(here)
    return status, out.getvalue(), err.getvalue()


def in_process(home: Path, line: str, *extra: str) -> str:
    """``call`` for a line that must succeed: its output."""
    status, out, err = call(home, line, *extra)
    assert status == 0, f"{line}\n{out}\n{err}"
    return out


def json_of(home: Path, line: str) -> Any:
    """A cmdlet line's --json output, parsed."""
    done = run(home, line, "--json")
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"{line} --json printed no JSON: {done.stdout!r}") from exc


def fresh_home(tmp_path: Path, *lines: str) -> Path:
    """A folder for ``hubport run``: the embedded default's listeners moved to free ports
    (with the cmdlet), then ``lines``."""
    home = tmp_path / "home"
    home.mkdir()
    for connector in ("Default HUB01", "Client HUB01"):
        run(home, f"Set-ReceiveConnector 'HUB01\\{connector}' -Bindings"
                  f" 127.0.0.1:{free_port()}")
    for line in lines:
        run(home, line)
    return home
