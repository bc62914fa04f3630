"""Registers the built-in delivery agents through the same hook third-party agents use."""

from __future__ import annotations

from collections.abc import Callable

from hubport.agents.command import CommandAgent
from hubport.agents.drop import DropDirectoryAgent
from hubport.agents.http import HttpAgent
from hubport.agents.maildir import MaildirAgent
from hubport.core import hookimpl


@hookimpl
def register_delivery_agents(register: Callable[[str, type], None]) -> None:
    register("DROP", DropDirectoryAgent)
    register("MAILDIR", MaildirAgent)
    register("HTTP", HttpAgent)
    register("COMMAND", CommandAgent)
