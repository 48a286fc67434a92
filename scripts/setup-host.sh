#!/bin/sh
# Install what netplug's tests, lab and demo need on a Debian 12 host (idempotent).
# Run as root. Packages: the lab's libvirtd/QEMU/dnsmasq/iptables, libvirt-dev + pkg-config
# to build libvirt-python, busybox-static + cpio for the guest initramfs, iproute2 for the
# tests' oracle. python3-venv, python3-lxml, python3-wheel: the benches run the hook on
# Debian's /usr/bin/python3 as a host has it (bench/hookenv.py).
set -eu
PKGS="libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 iptables
dnsmasq-base libvirt-dev pkg-config busybox-static cpio gzip iproute2 procps util-linux kmod
python3-venv python3-lxml python3-wheel"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup-host: installing:$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing >/dev/null
else
    echo "setup-host: Debian packages present" >&2
fi
