"""Connector types, one module each, plugged into the core through hubport's hooks."""
