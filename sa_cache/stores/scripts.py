"""Lua scripts, kept in their own files (``stores/*.lua``) and loaded by name."""

from __future__ import annotations

from importlib import resources


def lua_script(name: str) -> str:
    """The text of ``stores/<name>.lua``."""
    return (resources.files("sa_cache.stores") / f"{name}.lua").read_text()
