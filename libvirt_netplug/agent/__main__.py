"""python -m libvirt_netplug.agent: the same as ``netplug agent``."""

import sys

from ..cli import main

sys.exit(main(["agent", *sys.argv[1:]]))
