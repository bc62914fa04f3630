"""Every hook and every name of the public API (``hubport.core.api``) is documented."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from hubport.core import api, delivery, folder_writer, hookspecs
from hubport.core.config_fields import FieldReader
from hubport.core.model import SmtpResponse
from support import undocumented_members

DOCS = Path(__file__).resolve().parents[1] / "docs"


def documented_sections(page: str) -> set[str]:
    text = (DOCS / page).read_text()
    return set(re.findall(r"^#+ `([a-z_]+)`", text, flags=re.M))


def test_every_hook_spec_has_a_section_in_docs_hooks_md() -> None:
    specs = {name for name, fn in vars(hookspecs).items()
             if inspect.isfunction(fn) and hasattr(fn, "hubport_spec")}
    assert specs, "no hook specs found"
    missing = specs - documented_sections("hooks.md")
    assert not missing, f"hooks without a section in docs/hooks.md: {sorted(missing)}"


def test_docs_hooks_md_names_no_hook_that_does_not_exist() -> None:
    specs = {name for name, fn in vars(hookspecs).items() if hasattr(fn, "hubport_spec")}
    assert documented_sections("hooks.md") <= specs


def test_every_hook_spec_has_a_docstring() -> None:
    for name, fn in vars(hookspecs).items():
        if hasattr(fn, "hubport_spec"):
            assert (fn.__doc__ or "").strip(), name


def test_delivery_agent_api_is_documented_in_docstrings() -> None:
    for cls in (api.DeliveryAgent, api.MailItem, api.ItemResult, api.RecipientResult,
                api.DeferQueue, api.FailQueue, api.DeliveryContext):
        assert (cls.__doc__ or "").strip(), cls.__name__
    for name in ("open", "deliver", "deliver_many", "close"):
        assert (getattr(api.DeliveryAgent, name).__doc__ or "").strip(), name


def test_the_public_api_exports_exactly_its_all() -> None:
    """``__all__`` is the contract: every name resolves, and nothing public sneaks in."""
    assert all(hasattr(api, name) for name in api.__all__)
    public = {name for name in vars(api) if not name.startswith("_") and name != "annotations"}
    assert public == set(api.__all__) - {"__version__"}, public ^ set(api.__all__)


def test_docs_reference_md_names_every_public_name_of_the_agent_api_and_settings_reader(
        ) -> None:
    text = (DOCS / "reference.md").read_text()
    names = api.__all__
    missing = [name for name in names if f"`{name}`" not in text and f"class {name}" not in text]
    assert not missing, f"hubport.core.api names missing from docs/reference.md: {missing}"
    # every member of the delivery contract's own classes, and of the two the agents use most
    contract = [value for name in names if isinstance(value := getattr(api, name), type)
                and value.__module__ in (delivery.__name__, folder_writer.__name__)]
    assert len(contract) >= 9, contract
    for cls in (*contract, SmtpResponse, FieldReader):
        undocumented = undocumented_members(cls, text)
        assert not undocumented, (
            f"{cls.__name__} members missing from docs/reference.md: {undocumented}")
    assert "`hookimpl`" in text and "`hookspec`" in text



#: citations of documents the repository does not ship (reference material kept elsewhere)
UNSHIPPED = re.compile(r"EXCHANGE\.md|EXCHANGE §|RELIABILITY(\.md| §)|DESIGN(\.md| §)|ANCHORS\.md"
                       r"|BASELINES\.md|TESTING\.md")


def _source_files() -> list[Path]:
    """README.md and every .py, .md and .toml file of the shipped folders (not build output)."""
    root = DOCS.parent
    files = [root / "README.md"]
    for folder in ("core", "plugins", "agents", "tests", "docs", "bench", "examples"):
        files += [p for p in sorted((root / folder).rglob("*")) if p.suffix in (".py", ".md", ".toml")
                  and "build" not in p.relative_to(root).parts]
    assert len(files) > 50, files
    return files


def test_docs_exchange_md_has_every_section_the_code_cites() -> None:
    headings = set(re.findall(r"^## (.+)$", (DOCS / "exchange.md").read_text(), flags=re.M))
    cited: dict[str, str] = {}
    for path in _source_files():
        for name in re.findall(r'docs/exchange\.md, "([^"]+)"', path.read_text()):
            cited.setdefault(" ".join(name.split()), str(path.relative_to(DOCS.parent)))
    assert cited, "nothing cites docs/exchange.md"
    missing = {name: where for name, where in cited.items() if name not in headings}
    assert not missing, f"citations of sections docs/exchange.md does not have: {missing}"


def test_code_and_docs_cite_only_documents_the_repository_ships() -> None:
    offenders = []
    for path in _source_files():
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if UNSHIPPED.search(line):
                offenders.append(f"{path.relative_to(DOCS.parent)}:{number}: {line.strip()}")
    assert not offenders, "citations of documents the repository does not ship:\n" + "\n".join(
        offenders)
