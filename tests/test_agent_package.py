"""The example third-party agent installs from its folder into a fresh virtualenv (offline)
and hubport discovers it through its entry point; its own tests pass with the fixtures of
hubport's pytest plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIRS = ("/opt/wheels", "/opt/pypi/files", "/opt/pypi-more/files")
EXAMPLE = ROOT / "examples" / "hubport-sms-agent"


def run(*args: str, cwd: Path, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=240,
                          check=False, env={**os.environ, **(env or {})})


def test_example_installs_into_a_fresh_venv_and_is_discovered(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    made = run(sys.executable, "-m", "venv", "--system-site-packages", str(venv), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    # hubport (installed editable) and its dependencies come from this checkout's virtualenv,
    # *after* the fresh venv's own site-packages (a .pth file that adds ours as a site
    # directory, so its editable-install hook runs), so the example is found there first
    site = run(str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
               cwd=tmp_path).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (Path(site) / "hubport-checkout.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in ours))
    if run(str(python), "-c", "import wheel", cwd=tmp_path).returncode != 0:
        # setuptools < 70.1 needs the wheel package to build; take it from a local mirror
        links = [f"--find-links={d}" for d in WHEEL_DIRS if Path(d).is_dir()]
        got = run(str(python), "-m", "pip", "install", "--no-index", *links, "wheel", cwd=tmp_path)
        if got.returncode != 0:
            pytest.skip("the wheel package is not installable offline here")
    # hubport itself comes from this checkout; the example is copied so no build litter lands
    # in the source tree
    env = {"PIP_NO_INDEX": "1"}
    installed = run(str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                    "--no-index", str(EXAMPLE), cwd=tmp_path, env=env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    listed = run(str(python), "-m", "hubport.core.cli", "plugins", "--json", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    assert '"name": "sms"' in listed.stdout and '"version": "0.1.0"' in listed.stdout
    assert '"module": "hubport_sms_agent"' in listed.stdout
    where = run(str(python), "-c", "import importlib.metadata as m; "
                "print(m.distribution('hubport-sms-agent').locate_file(''))", cwd=tmp_path, env=env)
    assert str(venv) in where.stdout, where.stdout + where.stderr
    text = run(str(python), "-m", "hubport.core.cli", "plugins", cwd=tmp_path, env=env).stdout
    assert "SMS" in text.split("Delivery agents:")[1]


def test_the_examples_own_tests_pass_with_the_shipped_fixtures() -> None:
    done = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests",
               cwd=EXAMPLE, env={"PYTHONPATH": str(EXAMPLE)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "4 passed" in done.stdout
