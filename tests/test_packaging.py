"""hubport installs under its own name: ``hubport.core``, ``hubport.plugins``, ``hubport.agents``.

The source folders stay at the top of the checkout; setup.cfg maps them under the namespace
package ``hubport``, so no generic name (``core``, ``agents``) lands in site-packages. A wheel
is built from the files git tracks (what a clean clone holds), installed into a fresh virtualenv
that cannot see this checkout, and run from a clean folder.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import importlib.util
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import hubport.core
from smtp_support import free_port
from support import maildir
from test_postmaster import default_org_text

pytestmark = pytest.mark.timeout(400)

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("core", "plugins", "agents")


def run(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_every_package_folder_is_listed_in_setup_cfg() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {"hubport." + ".".join(init.parent.relative_to(ROOT).parts)
             for folder in SOURCE_FOLDERS for init in (ROOT / folder).rglob("__init__.py")
             if "__pycache__" not in init.parts}
    assert listed == found, f"setup.cfg lists {sorted(listed)}, the tree has {sorted(found)}"


def test_the_suite_imports_hubport_only_by_its_installed_names() -> None:
    # the checkout is not on sys.path (no pytest "pythonpath = ."), so a stale bare import
    # fails here exactly as it would in an installed hubport
    for bare in SOURCE_FOLDERS:
        assert importlib.util.find_spec(bare) is None, f"'import {bare}' works in the suite"
    assert Path(hubport.core.__file__ or "").resolve() == ROOT / "core" / "__init__.py"
    assert importlib.metadata.version("hubport") == hubport.core.__version__


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any level (``TYPE_CHECKING`` blocks included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_core_imports_neither_plugins_nor_agents_nor_its_own_api() -> None:
    # the core owns the contracts; connector types and agents plug in through the hooks,
    # and hubport.core.api sits on top of the core (importing it from inside would cycle)
    for path in sorted((ROOT / "core").glob("*.py")):
        bad = {m for m in imported_modules(path)
               if m.startswith(("hubport.plugins", "hubport.agents", "hubport.core.api"))
               or m.split(".")[0] in SOURCE_FOLDERS}
        assert path.name == "api.py" or not bad, f"core/{path.name} imports {sorted(bad)}"


PUBLIC = ("hubport.core.api", "hubport.plugins.pytest_plugin")


def test_the_example_and_the_docs_import_only_the_public_api() -> None:
    example = ROOT / "examples" / "hubport-sms-agent"
    sources = {p: imported_modules(p) for p in example.rglob("*.py") if "build" not in p.parts}
    for page in [ROOT / "README.md", example / "README.md", *(ROOT / "docs").glob("*.md")]:
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
            sources[page] = sources.get(page, set()) | set(
                re.findall(r"^\s*(?:from|import) (hubport[\w.]*)", block, flags=re.M))
    for where, modules in sources.items():
        private = {m for m in modules if m.startswith("hubport.") and not m.startswith(PUBLIC)}
        assert not private, f"{where.relative_to(ROOT)} imports internals: {sorted(private)}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel .`` of the files git tracks or would add (no build litter, nothing ignored):
    what a clean clone of the next commit holds."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to know the tracked files")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    tracked = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                  cwd=ROOT).stdout.split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", work / "dist",
                source, cwd=work)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (found,) = (work / "dist").glob("hubport-*.whl")
    return found


def test_the_wheel_holds_only_the_hubport_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    version = hubport.core.__version__
    dist_info = f"hubport-{version}.dist-info/"
    strays = [n for n in names if not n.startswith(("hubport/", dist_info))]
    assert not strays, f"files outside the hubport namespace: {strays}"
    # a namespace package: other distributions may add hubport.<something> of their own
    assert "hubport/__init__.py" not in names
    for folder in SOURCE_FOLDERS:
        assert f"hubport/{folder}/__init__.py" in names and f"hubport/{folder}/py.typed" in names
    assert "hubport/core/default.toml" in names and "hubport/core/api.py" in names
    assert any(n.startswith(dist_info) and n.endswith("LICENSE") for n in names), names
    entry_points = zipfile.ZipFile(wheel).read(dist_info + "entry_points.txt").decode()
    assert "hubport = hubport.core.cli:main" in entry_points
    assert "hubport = hubport.plugins.pytest_plugin" in entry_points
    assert "delivery-agent = hubport.plugins.delivery_agent" in entry_points


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv (nothing of this checkout visible) with the wheel and its
    dependencies installed from the package index, as an administrator would."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    made = run(sys.executable, "-m", "venv", venv, cwd=venv.parent)
    assert made.returncode == 0, made.stderr
    done = run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel, cwd=venv)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return venv


def test_installed_hubport_is_importable_only_under_its_namespace(installed: Path,
                                                                  tmp_path: Path) -> None:
    python = installed / "bin" / "python"
    where = run(python, "-c", "import hubport.core.api, hubport.plugins.smtp_send, "
                "hubport.agents.drop; print(hubport.core.__file__)", cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(installed)), where.stdout
    for bare in SOURCE_FOLDERS:
        stale = run(python, "-c", f"import {bare}", cwd=tmp_path)
        assert stale.returncode != 0 and "ModuleNotFoundError" in stale.stderr, (bare, stale)
    version = run(installed / "bin" / "hubport", "--version", cwd=tmp_path)
    assert version.stdout.strip() == f"hubport {hubport.core.__version__}", version


def test_installed_hubport_runs_from_a_clean_folder(installed: Path, tmp_path: Path) -> None:
    default_port, client_port = free_port(), free_port()
    (tmp_path / "org.toml").write_text(default_org_text(default_port, client_port))
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([installed / "bin" / "hubport", "run", "--config", "org.toml"],
                                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline, last = time.monotonic() + 90, ""
        while True:
            try:
                with smtplib.SMTP("127.0.0.1", default_port, timeout=30) as client:
                    client.sendmail("someone@example.org", ["alice.smith@contoso.test"],
                                    b"Subject: from the wheel\r\n\r\nhello\r\n")
                break
            except OSError as exc:
                last = repr(exc)
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no SMTP on {default_port}: {last}"
            time.sleep(0.2)
        deadline = time.monotonic() + 90
        while not maildir(tmp_path, "Alice"):
            assert time.monotonic() < deadline, "not delivered:\n" + log.read_text()[-3000:]
            time.sleep(0.2)
        assert b"from the wheel" in maildir(tmp_path, "Alice")[0].read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]
    assert (tmp_path / "var").is_dir()
