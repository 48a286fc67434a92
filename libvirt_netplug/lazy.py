"""Packages whose names load on first use (PEP 562): the CLI imports a subcommand's package
for its arguments only, and a test of one piece need not load the others."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``names`` maps each name to the submodule
    that defines it, imported when the name is first asked for."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{module}", package), name)

    return __getattr__
