"""Registers the built-in methods (imported lazily by the registry)."""
