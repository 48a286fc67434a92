"""The hook path's modules import none of the standard library modules a hook does without
(issue 11: importing them cost every hook milliseconds; tests/kernel/test_hook_imports.py
checks the installed hook's real runs).

Proves: importing every module of the hook path, in a fresh interpreter, loads neither
logging (hooklog writes the hook's log), dataclasses nor inspect (values), nor typing
(annotations are strings; type-checker names sit behind TYPE_CHECKING = False).
"""

from __future__ import annotations

import subprocess
import sys

HOOK_PATH = ("hook", "hooklog", "values", "model", "plan", "apply", "policy", "state", "kernel",
             "netlink", "ops", "errors", "xmlsafe", "hookresult")
NOT_ON_THE_HOOK_PATH = ("logging", "dataclasses", "inspect", "typing")


def test_the_hook_modules_import_none_of_what_a_hook_does_without():
    # lxml (the hook's parser, required) may import some of them itself (pip's lxml 6
    # imports inspect): those are not the hook path's doing.
    code = ("import sys, lxml.etree\nlxml_ones = set(sys.modules)\n"
            f"from libvirt_netplug import {', '.join(HOOK_PATH)}\n"
            f"print(' '.join(m for m in {NOT_ON_THE_HOOK_PATH!r} "
            "if m in sys.modules and m not in lxml_ones))\n")
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == []
