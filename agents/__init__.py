"""Delivery agents: the API custom agents implement, and the built-in agents.

Built-ins: the Drop directory writer used by Foreign connectors (``agents.drop``) and the
Maildir writer used for local mailboxes (``agents.maildir``), and for Delivery Agent
connectors the HTTP agent (``agents.http``) and the command agent (``agents.command``).
"""
