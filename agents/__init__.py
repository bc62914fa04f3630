"""The built-in delivery agents, and the runner that drives any agent.

The agent contract itself (``DeliveryAgent``, ``MailItem``, ``ItemResult`` ...) belongs to
the core: ``hubport.core.api``. Built-ins: the Drop directory writer used by Foreign
connectors (``hubport.agents.drop``), the Maildir writer used for local mailboxes
(``hubport.agents.maildir``), and for Delivery Agent connectors the HTTP agent
(``hubport.agents.http``) and the command agent (``hubport.agents.command``).
"""
