"""libvirt-netplug: bridge MAC-table management and macvtap RX-filter sync for libvirt hosts."""
