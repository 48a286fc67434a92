"""Reading the state dir for the read-only commands (status, doctor, metrics).

One corrupt or wrong-shaped domain record must affect only its own domain: it is reported
(``record_errors``: domain name -> one line) and the other records are read as usual —
StateDir does this itself (``domains()`` returns only the valid records).
"""

from __future__ import annotations

from .state import StateDir


def reading_state(path: str | None) -> StateDir:
    """A StateDir for a read-only command: corrupt records are reported, not fatal."""
    return StateDir(path)


def record_errors(state: StateDir) -> dict[str, str]:
    """Domain name -> why its record cannot be used (empty when all are fine)."""
    return state.record_errors()
