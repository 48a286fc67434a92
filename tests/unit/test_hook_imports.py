"""The hook path's modules import none of the standard library modules a hook does without
(issue 11: importing them cost every hook milliseconds; tests/kernel/test_hook_imports.py
checks the installed hook's real runs).

Proves: importing every module of the hook path, in a fresh interpreter, loads neither
logging (hooklog writes the hook's log), dataclasses nor inspect (values; lxml.etree gets a
stand-in for the inspect functions it binds at import), nor typing (annotations are strings;
type-checker names sit behind TYPE_CHECKING = False), nor socket and signal (their C modules
serve); and lxml still works where it calls those inspect functions (a parser target that
takes nsmap).
"""

from __future__ import annotations

import subprocess
import sys

HOOK_PATH = ("hook", "hooklog", "values", "model", "plan", "apply", "policy", "state", "kernel",
             "netlink", "ops", "errors", "xmlsafe", "hookresult")
NOT_ON_THE_HOOK_PATH = ("logging", "dataclasses", "inspect", "typing", "socket", "signal")


def run(code: str) -> str:
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_the_hook_modules_import_none_of_what_a_hook_does_without():
    # What lxml.etree itself imports (pip's lxml 6: typing) is lxml's doing; inspect is not
    # imported with it (xmlsafe).
    out = run("import sys\nfrom libvirt_netplug import xmlsafe\nlxml_ones = set(sys.modules)\n"
              "assert 'inspect' not in lxml_ones\n"
              f"from libvirt_netplug import {', '.join(HOOK_PATH)}\n"
              f"print(' '.join(m for m in {NOT_ON_THE_HOOK_PATH!r} "
              "if m in sys.modules and m not in lxml_ones))\n")
    assert out.split() == []


def test_lxml_calls_the_real_inspect_functions_through_the_stand_in():
    out = run("import sys\nfrom libvirt_netplug.xmlsafe import etree\n"
              "assert 'inspect' not in sys.modules\n"
              "class Target:\n"
              "    seen = []\n"
              "    def start(self, tag, attrib, nsmap):\n"
              "        self.seen.append((tag, dict(nsmap)))\n"
              "    def close(self):\n"
              "        return self.seen\n"
              "parser = etree.XMLParser(target=Target())\n"
              "print(etree.fromstring(b'<a xmlns:x=\"urn:x\"><x:b/></a>', parser))\n"
              "print('inspect' in sys.modules, type(sys.modules['inspect']).__name__)\n")
    # lxml passes nsmap only to a start() that its getfullargspec says takes it.
    assert out.splitlines() == ["[('a', {'x': 'urn:x'}), ('{urn:x}b', {})]", "True module"]
