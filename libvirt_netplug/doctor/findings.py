"""doctor's findings: a level, a subject, a stable check id, a message and what to do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


LEVELS = ("ok", "info", "warning", "error")
RELOAD = ("systemctl reload libvirtd (or, with the modular daemons, systemctl reload "
          "virtqemud virtnetworkd)")


@dataclass(frozen=True)
class Finding:
    level: str  # ok | info | warning | error
    subject: str  # "bridge br0", "hooks", "agent", "network mgd", ...
    check: str  # a stable id: vlan-filtering, guest-ports, uplink, goal, hooks, agent, ...
    message: str
    advice: str | None = None  # what to do (None when there is nothing to do)

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "subject": self.subject, "check": self.check,
                "message": self.message, "advice": self.advice}

    def lines(self) -> list[str]:
        out = [f"[{self.level.upper()}] {self.subject}: {self.message}"]
        if self.advice:
            out.append(f"    -> {self.advice}")
        return out



def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"
