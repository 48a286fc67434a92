"""The VLAN-kernel tier: tests that need bridge VLAN filtering, run inside a QEMU (TCG) guest
booting Debian's own kernel on the host's root filesystem (see vm.py, image.py and inner/).

`python -m tests.vlankernel --help` for the command line; `make test-vlankernel` for the tier.
"""
