"""hubport's core: message model, queue, config, categorizer, routing, hooks and pipeline.

Plugin authors import the two pluggy markers from here::

    from hubport.core import hookimpl

    @hookimpl
    def on_categorized(message, recipients): ...
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "hubport"
__version__ = "0.1.0"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["PROJECT_NAME", "__version__", "hookimpl", "hookspec"]
