"""Registers the built-in delivery agents through the same hook third-party agents use."""

from __future__ import annotations

from collections.abc import Callable

from agents.command import CommandAgent
from agents.drop import DropDirectoryAgent
from agents.http import HttpAgent
from agents.maildir import MaildirAgent
from core import hookimpl


@hookimpl
def register_delivery_agents(register: Callable[[str, type], None]) -> None:
    register("DROP", DropDirectoryAgent)
    register("MAILDIR", MaildirAgent)
    register("HTTP", HttpAgent)
    register("COMMAND", CommandAgent)
