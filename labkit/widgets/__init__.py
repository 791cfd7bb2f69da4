"""Widgets only render: they subscribe to labkit.core.events or take results, and draw them.

Each view has a text fallback so the same code runs in a terminal, in tests and in CI.
"""
