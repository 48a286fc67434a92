"""The __init__ of each value class of the hook path, written out (generated: do not edit).

values.frozen/values.mutable take a class's __init__ from here when its parameters and
defaults are the class's fields, instead of compiling one: compiling them cost every hook
~2.5 ms. One that no longer fits is not used (the class compiles its own, as any other
value class does), and tests/unit/test_values.py fails until this file is written again:
    NETPLUG_REGEN_INITS=1 .venv/bin/python -m pytest tests/unit/test_values.py
"""

from .values import MISSING, default_of

_sa = object.__setattr__


def policy__Policy(self, promisc_links=None, sticky=None, vlan_filtering=None, strict=None,
                   rx_filters=None, max_multicast=None, max_unicast=None, sources=()):
    _sa(self, 'promisc_links', promisc_links)
    _sa(self, 'sticky', sticky)
    _sa(self, 'vlan_filtering', vlan_filtering)
    _sa(self, 'strict', strict)
    _sa(self, 'rx_filters', rx_filters)
    _sa(self, 'max_multicast', max_multicast)
    _sa(self, 'max_unicast', max_unicast)
    _sa(self, 'sources', sources)


def policy__Config(self, path=None, bridges=MISSING, direct=MISSING, strict=False):
    _sa(self, 'path', path)
    _sa(self, 'bridges', default_of(self, 'bridges') if bridges is MISSING else bridges)
    _sa(self, 'direct', default_of(self, 'direct') if direct is MISSING else direct)
    _sa(self, 'strict', strict)


def model__Interface(self, index, type, mac, target, alias, source_bridge, source_network,
                     source_dev, source_mode, portid, model, trust_guest_rx_filters, vlan_tag):
    _sa(self, 'index', index)
    _sa(self, 'type', type)
    _sa(self, 'mac', mac)
    _sa(self, 'target', target)
    _sa(self, 'alias', alias)
    _sa(self, 'source_bridge', source_bridge)
    _sa(self, 'source_network', source_network)
    _sa(self, 'source_dev', source_dev)
    _sa(self, 'source_mode', source_mode)
    _sa(self, 'portid', portid)
    _sa(self, 'model', model)
    _sa(self, 'trust_guest_rx_filters', trust_guest_rx_filters)
    _sa(self, 'vlan_tag', vlan_tag)


def model__Domain(self, name, uuid, interfaces, policy=MISSING, interface_policies=()):
    _sa(self, 'name', name)
    _sa(self, 'uuid', uuid)
    _sa(self, 'interfaces', interfaces)
    _sa(self, 'policy', default_of(self, 'policy') if policy is MISSING else policy)
    _sa(self, 'interface_policies', interface_policies)


def model__Network(self, name, uuid, bridge, forward_mode, forward_devs, mac_table_manager, policy,
                   policy_error=None):
    _sa(self, 'name', name)
    _sa(self, 'uuid', uuid)
    _sa(self, 'bridge', bridge)
    _sa(self, 'forward_mode', forward_mode)
    _sa(self, 'forward_devs', forward_devs)
    _sa(self, 'mac_table_manager', mac_table_manager)
    _sa(self, 'policy', policy)
    _sa(self, 'policy_error', policy_error)


def model__NetworkPort(self, network, uuid, owner_name, owner_uuid, mac, plug_type, plug_bridge,
                       plug_dev):
    _sa(self, 'network', network)
    _sa(self, 'uuid', uuid)
    _sa(self, 'owner_name', owner_name)
    _sa(self, 'owner_uuid', owner_uuid)
    _sa(self, 'mac', mac)
    _sa(self, 'plug_type', plug_type)
    _sa(self, 'plug_bridge', plug_bridge)
    _sa(self, 'plug_dev', plug_dev)


def ops__Context(self, domain=None, interface=None, mac=None, bridge=None, network=None,
                 lower=None):
    _sa(self, 'domain', domain)
    _sa(self, 'interface', interface)
    _sa(self, 'mac', mac)
    _sa(self, 'bridge', bridge)
    _sa(self, 'network', network)
    _sa(self, 'lower', lower)


def ops__Operation(self, ctx, device):
    _sa(self, 'ctx', ctx)
    _sa(self, 'device', device)


def ops__ReplaceFdb(self, ctx, device, mac, vlan=None, sticky=False, also_vlans=()):
    _sa(self, 'ctx', ctx)
    _sa(self, 'device', device)
    _sa(self, 'mac', mac)
    _sa(self, 'vlan', vlan)
    _sa(self, 'sticky', sticky)
    _sa(self, 'also_vlans', also_vlans)


def ops__DeleteFdb(self, ctx, device, mac, vlan=None):
    _sa(self, 'ctx', ctx)
    _sa(self, 'device', device)
    _sa(self, 'mac', mac)
    _sa(self, 'vlan', vlan)


def ops__SetPortFlags(self, ctx, device, learning, flood, prev_learning=None, prev_flood=None):
    _sa(self, 'ctx', ctx)
    _sa(self, 'device', device)
    _sa(self, 'learning', learning)
    _sa(self, 'flood', flood)
    _sa(self, 'prev_learning', prev_learning)
    _sa(self, 'prev_flood', prev_flood)


def ops__SetVlanFiltering(self, ctx, device, on=True):
    _sa(self, 'ctx', ctx)
    _sa(self, 'device', device)
    _sa(self, 'on', on)


def plan__Note(self, level, message, once_key=None):
    _sa(self, 'level', level)
    _sa(self, 'message', message)
    _sa(self, 'once_key', once_key)


def plan__PortIntent(self, domain, interface, bridge, network, policy, managed, reason, hold=False,
                     extra_macs=(), claims=False):
    _sa(self, 'domain', domain)
    _sa(self, 'interface', interface)
    _sa(self, 'bridge', bridge)
    _sa(self, 'network', network)
    _sa(self, 'policy', policy)
    _sa(self, 'managed', managed)
    _sa(self, 'reason', reason)
    _sa(self, 'hold', hold)
    _sa(self, 'extra_macs', extra_macs)
    _sa(self, 'claims', claims)


def plan__Observed(self, links, fdb=MISSING, entries=MISSING, vlans=MISSING, owners=MISSING):
    _sa(self, 'links', links)
    _sa(self, 'fdb', default_of(self, 'fdb') if fdb is MISSING else fdb)
    _sa(self, 'entries', default_of(self, 'entries') if entries is MISSING else entries)
    _sa(self, 'vlans', default_of(self, 'vlans') if vlans is MISSING else vlans)
    _sa(self, 'owners', default_of(self, 'owners') if owners is MISSING else owners)


def plan__Plan(self, ops=(), notes=(), intents=(), cleaned=(), skipped=(), claimed=()):
    _sa(self, 'ops', ops)
    _sa(self, 'notes', notes)
    _sa(self, 'intents', intents)
    _sa(self, 'cleaned', cleaned)
    _sa(self, 'skipped', skipped)
    _sa(self, 'claimed', claimed)


def apply__ApplyResult(self, applied=MISSING, errors=MISSING, rolled_back=MISSING, done=MISSING,
                       undone=MISSING):
    _sa(self, 'applied', default_of(self, 'applied') if applied is MISSING else applied)
    _sa(self, 'errors', default_of(self, 'errors') if errors is MISSING else errors)
    _sa(self, 'rolled_back',
        default_of(self, 'rolled_back') if rolled_back is MISSING else rolled_back)
    _sa(self, 'done', default_of(self, 'done') if done is MISSING else done)
    _sa(self, 'undone', default_of(self, 'undone') if undone is MISSING else undone)


def kernel__Link(self, name, index, kind, address, master, lower, up, promisc, allmulti,
                 promiscuity, allmulti_count, bridge_port=False, learning=None, flood=None,
                 vlan_filtering=None, macvlan_mode=None):
    _sa(self, 'name', name)
    _sa(self, 'index', index)
    _sa(self, 'kind', kind)
    _sa(self, 'address', address)
    _sa(self, 'master', master)
    _sa(self, 'lower', lower)
    _sa(self, 'up', up)
    _sa(self, 'promisc', promisc)
    _sa(self, 'allmulti', allmulti)
    _sa(self, 'promiscuity', promiscuity)
    _sa(self, 'allmulti_count', allmulti_count)
    _sa(self, 'bridge_port', bridge_port)
    _sa(self, 'learning', learning)
    _sa(self, 'flood', flood)
    _sa(self, 'vlan_filtering', vlan_filtering)
    _sa(self, 'macvlan_mode', macvlan_mode)


def kernel__FdbEntry(self, port, mac, vlan, state, sticky=False, extern_learn=False):
    _sa(self, 'port', port)
    _sa(self, 'mac', mac)
    _sa(self, 'vlan', vlan)
    _sa(self, 'state', state)
    _sa(self, 'sticky', sticky)
    _sa(self, 'extern_learn', extern_learn)


def kernel__PortVlans(self, vids, pvid=None, untagged=frozenset()):
    _sa(self, 'vids', vids)
    _sa(self, 'pvid', pvid)
    _sa(self, 'untagged', untagged)


def hookresult__HookResult(self, object, name, operation, subop, at, ok, errors=0, error=None,
                           exit_status=0, pid=None):
    _sa(self, 'object', object)
    _sa(self, 'name', name)
    _sa(self, 'operation', operation)
    _sa(self, 'subop', subop)
    _sa(self, 'at', at)
    _sa(self, 'ok', ok)
    _sa(self, 'errors', errors)
    _sa(self, 'error', error)
    _sa(self, 'exit_status', exit_status)
    _sa(self, 'pid', pid)


def rxops__AddMulticast(self, ctx, device, mac):
    _sa(self, 'ctx', ctx)
    _sa(self, 'device', device)
    _sa(self, 'mac', mac)


def rxops__DelMulticast(self, ctx, device, mac):
    _sa(self, 'ctx', ctx)
    _sa(self, 'device', device)
    _sa(self, 'mac', mac)


def rxops__AddUnicast(self, ctx, device, mac):
    _sa(self, 'ctx', ctx)
    _sa(self, 'device', device)
    _sa(self, 'mac', mac)


def rxops__DelUnicast(self, ctx, device, mac):
    _sa(self, 'ctx', ctx)
    _sa(self, 'device', device)
    _sa(self, 'mac', mac)


def rxops__SetAllmulti(self, ctx, device, on):
    _sa(self, 'ctx', ctx)
    _sa(self, 'device', device)
    _sa(self, 'on', on)


def rxops__SetPromisc(self, ctx, device, on):
    _sa(self, 'ctx', ctx)
    _sa(self, 'device', device)
    _sa(self, 'on', on)


def rxops__SetAddress(self, ctx, device, mac, prev_mac=None):
    _sa(self, 'ctx', ctx)
    _sa(self, 'device', device)
    _sa(self, 'mac', mac)
    _sa(self, 'prev_mac', prev_mac)
