"""Every hook and every public delivery-agent API member is documented."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from agents import api
from core import hookspecs

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
