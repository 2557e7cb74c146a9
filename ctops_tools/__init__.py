"""The tools that assemble ctops's services: the `ctops` CLI, the demo and test cluster launchers, the
embedded Redis, benches, the load client and chaos.

This is the top layer: it may import the services (`dispatcher`, `agents`, `trainer`, `console`) and the
shared package `ctops`; nothing below imports it (see the import-linter contracts in pyproject.toml).
"""
