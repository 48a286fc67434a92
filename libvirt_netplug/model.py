"""Typed model of the libvirt XML netplug reads: domains, networks, network ports.

Frozen value classes (values.frozen) filled from an explicit table of XPaths, with small
converters. No host probing here: the model is what the XML says, validated (MACs, interface
names), nothing more.
"""

from __future__ import annotations

from .errors import InputError, PolicyError
from .policy import NS, Policy, policy_from_element, policy_from_mapping
from .values import field, frozen
from .xmlsafe import etree, parse_xml

IFNAMSIZ = 16
# Checks by hand, not regular expressions: compiling them costs every hook ~0.2 ms.
_HEX = frozenset("0123456789abcdefABCDEF")


_IFNAME_BAD = frozenset("/:\x00")


def _is_mac(text: str) -> bool:
    """``[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}``, the whole string."""
    return len(text) == 17 and text[2::3] == ":::::" and \
        _HEX.issuperset(text[0::3] + text[1::3])


def normalize_mac(mac: str) -> str:
    return mac.lower()


def check_mac(mac: str | None, where: str, *, unicast: bool = True) -> str:
    """Return the normalized MAC or raise an InputError naming ``where``."""
    if mac is None or not _is_mac(mac):
        raise InputError(f"{where}: invalid MAC address {mac!r}; expected six hex octets like "
                         f"52:54:00:12:34:56")
    mac = normalize_mac(mac)
    if unicast and (int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00"):
        raise InputError(f"{where}: MAC address {mac} is not a unicast address")
    return mac


def _name_bytes(name: str) -> bytes | None:
    """The bytes Linux would get for ``name`` (names from argv carry undecodable bytes as
    surrogate escapes), or None when no bytes give it (a lone surrogate, e.g. a JSON
    record's "\\ud800")."""
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None


def ifname_ok(name: str | None) -> bool:
    """Linux's dev_valid_name(): 1-15 bytes, not '.'/'..', no '/', ':' or whitespace
    (``[/:\\s\\x00]``; str.split() splits at what a str pattern's \\s matches)."""
    if not name:
        return False
    raw = _name_bytes(name)
    return raw is not None and len(raw) < IFNAMSIZ and name not in (".", "..") and \
        _IFNAME_BAD.isdisjoint(name) and name.split() == [name]


def check_ifname(name: str | None, where: str) -> str:
    """Return ``name`` if it is a valid Linux interface name, else raise naming ``where``."""
    if ifname_ok(name):
        return name
    if name is None or name == "":
        raise InputError(f"{where}: empty interface name")
    raw = _name_bytes(name)
    if raw is not None and len(raw) >= IFNAMSIZ:
        raise InputError(f"{where}: interface name {name!r} is {len(raw)} bytes; Linux allows "
                         f"at most {IFNAMSIZ - 1}")
    raise InputError(f"{where}: {name!r} is not a valid Linux interface name (no '/', "
                     f"':', whitespace; not '.' or '..')")


def _attr(el: etree._Element | None, name: str) -> str | None:
    return None if el is None else el.get(name)


def _yes(value: str | None) -> bool:
    return value == "yes"


@frozen
class Interface:
    index: int  # position among the domain's <interface> elements
    type: str  # bridge, network, direct, ethernet, hostdev, user, vhostuser, ...
    mac: str | None
    target: str | None  # <target dev>: the tap / macvtap on the host
    alias: str | None  # <alias name>: QEMU's device id (net0), used for query-rx-filter
    source_bridge: str | None
    source_network: str | None
    source_dev: str | None  # type='direct' lower device
    source_mode: str | None  # type='direct' macvtap mode
    portid: str | None
    model: str | None
    trust_guest_rx_filters: bool
    vlan_tag: int | None  # single untagged/native VLAN tag from <vlan>, if any

    @property
    def display_name(self) -> str:
        """The alias libvirt gave the NIC, or its position when it has none."""
        return self.alias or f"#{self.index}"

    @property
    def is_macvtap(self) -> bool:
        return self.type == "direct" or (self.type == "network" and self.source_dev is not None
                                          and self.source_bridge is None)


@frozen
class Domain:
    name: str
    uuid: str | None
    interfaces: tuple[Interface, ...]
    policy: Policy = field(default_factory=Policy)  # domain-wide metadata attributes
    interface_policies: tuple[tuple[str, Policy], ...] = ()  # (mac, policy) from metadata

    def interface_policy(self, mac: str | None) -> Policy:
        for m, p in self.interface_policies:
            if m == mac:
                return p
        return Policy()


@frozen
class Network:
    name: str
    uuid: str | None
    bridge: str | None
    forward_mode: str | None  # None: isolated
    forward_devs: tuple[str, ...]
    mac_table_manager: str | None  # "kernel" | "libvirt"
    policy: Policy  # <bridge promiscLinks> layered under metadata
    policy_error: str | None = None  # an invalid policy: recorded, the network stays unmanaged

    @property
    def uses_macvtap(self) -> bool:
        return self.forward_mode in ("bridge", "private", "vepa", "passthrough") and \
            self.bridge is None

    def to_record(self) -> dict:
        """The JSON the network hook keeps in the state dir for the qemu hook to read."""
        return {"name": self.name, "uuid": self.uuid, "bridge": self.bridge,
                "forwardMode": self.forward_mode, "forwardDevs": list(self.forward_devs),
                "macTableManager": self.mac_table_manager, "policy": self.policy.to_json(),
                "policyError": self.policy_error}

    @classmethod
    def from_record(cls, rec: dict) -> "Network":
        try:
            policy = policy_from_mapping(rec.get("policy") or {}, f"network {rec['name']}")
            error = rec.get("policyError")
        except PolicyError as e:
            policy, error = Policy(), str(e)
        return cls(name=rec["name"], uuid=rec.get("uuid"), bridge=rec.get("bridge"),
                   forward_mode=rec.get("forwardMode"),
                   forward_devs=tuple(rec.get("forwardDevs") or ()),
                   mac_table_manager=rec.get("macTableManager"), policy=policy,
                   policy_error=error)


@frozen
class NetworkPort:
    network: Network
    uuid: str | None
    owner_name: str | None
    owner_uuid: str | None
    mac: str
    plug_type: str | None  # network | bridge | direct | hostdev-pci
    plug_bridge: str | None
    plug_dev: str | None


def _metadata_policy(root: etree._Element, where: str) -> etree._Element | None:
    found = root.findall(f"metadata/{{{NS}}}policy")
    if len(found) > 1:
        raise PolicyError(f"{where}: more than one <netplug:policy> element in <metadata>")
    return found[0] if found else None


def _parse_interface(el: etree._Element, index: int, domain_where: str) -> Interface:
    # One pass over the children instead of a find() per field: reconcile parses the live
    # XML of every running domain on each run (2,000 interfaces in the scale bench).
    sub: dict[str, etree._Element] = {}
    for child in el:
        tag = child.tag
        if isinstance(tag, str) and tag not in sub:
            sub[tag] = child
    itype = el.get("type") or ""
    src = sub.get("source")
    mac = _attr(sub.get("mac"), "address")
    alias = _attr(sub.get("alias"), "name")

    def where(what: str = "") -> str:
        name = f"interface {alias}" if alias else f"interface #{index}"
        return f"{domain_where} {name}" + (f" ({mac}) {what}" if what else "")

    if mac is not None:
        mac = check_mac(mac, where())
    target_el = sub.get("target")
    target = _attr(target_el, "dev")
    if target_el is not None and not ifname_ok(target):
        check_ifname(target, where("<target dev>"))
    src_bridge = _attr(src, "bridge")
    if src_bridge is not None and not ifname_ok(src_bridge):
        check_ifname(src_bridge, where("<source bridge>"))
    src_dev = _attr(src, "dev")
    if src_dev is not None and itype in ("direct", "network") and not ifname_ok(src_dev):
        check_ifname(src_dev, where("<source dev>"))
    vlan_tag = None
    vlan = sub.get("vlan")
    if vlan is not None:
        # netplug reads the VLANs a port is in from the kernel (libvirt configures them);
        # the XML's tags are checked here only so a bad one fails before any change.
        tags = vlan.findall("tag")
        ids = []
        for tag in tags:
            raw = tag.get("id", "")
            if not raw.isdigit() or not 0 <= int(raw) <= 4095:
                raise InputError(f"{where()}: invalid <vlan><tag id> {raw!r}; VLAN ids are "
                                 f"0-4095")
            ids.append(int(raw))
        if len(ids) == 1 and vlan.get("trunk") != "yes":
            vlan_tag = ids[0]
    return Interface(
        index=index, type=itype, mac=mac, target=target, alias=alias,
        source_bridge=src_bridge, source_network=_attr(src, "network"),
        source_dev=src_dev, source_mode=_attr(src, "mode"), portid=_attr(src, "portid"),
        model=_attr(sub.get("model"), "type"),
        trust_guest_rx_filters=_yes(el.get("trustGuestRxFilters")), vlan_tag=vlan_tag)


def parse_domain(data: bytes | str | etree._Element) -> Domain:
    root = data if isinstance(data, etree._Element) else parse_xml(data, "domain XML")
    if root.tag != "domain":
        raise InputError(f"domain XML: root element is <{root.tag}>, expected <domain>")
    name = root.findtext("name")
    if not name:
        raise InputError("domain XML: missing <name>")
    where = f"domain {name}"
    interfaces = []
    for i, el in enumerate(root.iterfind("devices/interface")):
        interfaces.append(_parse_interface(el, i, where))
    policy = Policy()
    iface_policies: list[tuple[str, Policy]] = []
    pel = _metadata_policy(root, where)
    if pel is not None:
        policy = policy_from_element(pel, f"{where} <metadata><netplug:policy>")
        for child in pel:
            if not isinstance(child.tag, str):
                continue
            if child.tag != f"{{{NS}}}interface":
                raise PolicyError(f"{where} <netplug:policy>: unknown child element "
                                  f"<{etree.QName(child).localname}>; expected "
                                  f"<netplug:interface mac='…'>")
            cmac = check_mac(child.get("mac"), f"{where} <netplug:interface>")
            iface_policies.append(
                (cmac, policy_from_element(child, f"{where} <netplug:interface mac='{cmac}'>")))
    return Domain(name=name, uuid=root.findtext("uuid"), interfaces=tuple(interfaces),
                  policy=policy, interface_policies=tuple(iface_policies))


def parse_network(data: bytes | str | etree._Element, *, lenient: bool = False) -> Network:
    """Parse a <network>; ``lenient`` records an invalid policy instead of raising.

    Hooks parse leniently: a broken policy must not stop a network from starting; it is
    logged and the network stays unmanaged.
    """
    root = data if isinstance(data, etree._Element) else parse_xml(data, "network XML")
    if root.tag == "hookData":
        found = root.find("network")
        if found is None:
            raise InputError("network hook XML: <hookData> has no <network>")
        root = found
    if root.tag != "network":
        raise InputError(f"network XML: root element is <{root.tag}>, expected <network>")
    name = root.findtext("name")
    if not name:
        raise InputError("network XML: missing <name>")
    where = f"network {name}"
    br = root.find("bridge")
    bridge = _attr(br, "name")
    if bridge is not None:
        check_ifname(bridge, f"{where} <bridge name>")
    fwd = root.find("forward")
    devs = tuple(d.get("dev") for d in root.iterfind("forward/interface") if d.get("dev"))
    policy = Policy()
    error = None
    try:
        if br is not None and br.get("promiscLinks") is not None:
            policy = policy_from_element(
                etree.Element("p", promiscLinks=br.get("promiscLinks")),
                f"{where} <bridge promiscLinks>")
        pel = _metadata_policy(root, where)
        if pel is not None:
            policy = policy_from_element(pel, f"{where} <metadata><netplug:policy>").over(policy)
    except PolicyError as e:
        if not lenient:
            raise
        policy, error = Policy(), str(e)
    return Network(name=name, uuid=root.findtext("uuid"), bridge=bridge,
                   forward_mode=_attr(fwd, "mode"), forward_devs=devs,
                   mac_table_manager=_attr(br, "macTableManager"), policy=policy,
                   policy_error=error)


def parse_network_port(data: bytes | str, *, lenient: bool = True) -> NetworkPort:
    """Parse a network hook's ``<hookData>`` carrying both <network> and <networkport>."""
    root = parse_xml(data, "network hook XML")
    if root.tag != "hookData":
        raise InputError(f"network hook XML: root element is <{root.tag}>, expected <hookData>")
    network = parse_network(root, lenient=lenient)
    port = root.find("networkport")
    if port is None:
        raise InputError(f"network {network.name}: hook XML has no <networkport>")
    where = f"network {network.name} port"
    owner = port.find("owner")
    owner_name = owner.findtext("name") if owner is not None else None
    if owner_name:
        where = f"{where} of domain {owner_name}"
    mac = check_mac(_attr(port.find("mac"), "address"), where)
    plug = port.find("plug")
    plug_bridge = _attr(plug, "bridge")
    if plug_bridge is not None:
        check_ifname(plug_bridge, f"{where} <plug bridge>")
    return NetworkPort(network=network, uuid=port.findtext("uuid"), owner_name=owner_name,
                       owner_uuid=owner.findtext("uuid") if owner is not None else None,
                       mac=mac, plug_type=_attr(plug, "type"), plug_bridge=plug_bridge,
                       plug_dev=_attr(plug, "dev"))
