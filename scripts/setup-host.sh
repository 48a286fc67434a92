#!/bin/sh
# Install what netplug's tests, lab and demo need on a Debian 12 or 13 host (idempotent).
# Run as root. Packages: the lab's libvirtd/QEMU/dnsmasq/iptables, libvirt-dev + pkg-config
# to build libvirt-python, busybox-static + cpio for the guest initramfs, iproute2 for the
# tests' oracle. python3-venv, python3-lxml, python3-wheel: the benches run the hook on
# Debian's /usr/bin/python3 as a host has it (bench/hookenv.py).
set -eu
PKGS="libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 iptables
dnsmasq-base libvirt-dev pkg-config busybox-static cpio gzip iproute2 procps util-linux kmod"
# The venv and libvirt-python's build (gcc, Python headers; pip over https); mmdebstrap builds
# the lab's root of the other Debian release (libvirt 11 on Debian 12, libvirt 9 on 13).
PKGS="$PKGS python3 python3-venv python3-dev gcc ca-certificates mmdebstrap
python3-lxml python3-wheel"
# From Debian 13 on, libvirt's network driver is a package of its own (a recommendation of
# libvirt-daemon, which --no-install-recommends skips); Debian 12's libvirt-daemon has it.
. /etc/os-release
case "${VERSION_CODENAME:-}" in
    bookworm) ;;
    *) PKGS="$PKGS libvirt-daemon-driver-network" ;;
esac
# shellcheck disable=SC2086
exec "$(dirname "$0")/apt-ensure.sh" setup-host $PKGS
