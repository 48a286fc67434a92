"""Hardened XML parsing for everything libvirt hands us.

libvirt's XML never carries a DTD, so we refuse any DOCTYPE outright (which also rules out
external entities and entity-expansion bombs), never resolve entities, never touch the
network, and cap the size at 10 MB.

Hook side: ``etree`` (lxml's) is imported here, for every module of the hook path.
"""

from __future__ import annotations

import sys

from .errors import InputError

MAX_XML_BYTES = 10 * 1024 * 1024

# lxml.etree imports `inspect` (and with it ast, dis, tokenize: ~5 ms, a sixth of a hook) only
# to bind a few of its functions, which it calls for parser targets (getfullargspec) and
# incremental writers (isgenerator): nothing a hook uses. While lxml.etree loads, `inspect`
# is a stand-in whose functions import the real module when first called; anything else
# lxml asks of it fails the import, which is then made again with the real module.
_INSPECT_NAMES = frozenset(("getfullargspec", "getargspec", "isgenerator"))


def _inspect_function(name: str):
    def call(*args, **kwargs):
        if isinstance(sys.modules.get("inspect"), _StandIn):
            del sys.modules["inspect"]
        import inspect

        return getattr(inspect, name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


class _StandIn(type(sys)):
    def __getattr__(self, name: str):
        if name not in _INSPECT_NAMES:
            raise AttributeError(name)
        return _inspect_function(name)


def _import_etree():
    if "lxml.etree" in sys.modules or "inspect" in sys.modules:
        from lxml import etree
        return etree
    sys.modules["inspect"] = _StandIn("inspect")
    try:
        from lxml import etree
    except ImportError:
        etree = None  # it asked for more than the stand-in has: import it as it is
    finally:
        if isinstance(sys.modules.get("inspect"), _StandIn):
            del sys.modules["inspect"]
    if etree is None:
        from lxml import etree
    return etree


etree = _import_etree()

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                          dtd_validation=False, huge_tree=False, remove_comments=True,
                          remove_pis=True)


def parse_xml(data: bytes | str, what: str) -> etree._Element:
    """Parse ``data`` or raise a one-line InputError naming ``what`` (e.g. "domain XML")."""
    if isinstance(data, str):
        data = data.encode()
    if len(data) > MAX_XML_BYTES:
        raise InputError(f"{what}: document is {len(data)} bytes, over the "
                         f"{MAX_XML_BYTES // (1024 * 1024)} MB limit")
    if not data.strip():
        raise InputError(f"{what}: empty input (expected XML on stdin or in the file)")
    # A DOCTYPE is how DTDs, external entities (XXE) and entity bombs get in; libvirt never
    # emits one. The byte check catches UTF-8/ASCII; the docinfo check catches other
    # encodings after a parse that resolves nothing.
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise InputError(f"{what}: DTDs and entity declarations are not allowed")
    try:
        root = etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError as e:
        msg = str(e).splitlines()[0] if str(e) else "syntax error"
        raise InputError(f"{what}: malformed XML: {msg}") from None
    except ValueError as e:
        raise InputError(f"{what}: malformed XML: {e}") from None
    if root is None:
        raise InputError(f"{what}: malformed XML: no root element")
    doctype = root.getroottree().docinfo.doctype
    if doctype:
        raise InputError(f"{what}: DTDs and entity declarations are not allowed")
    return root
