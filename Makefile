# libvirt-netplug: the two commands the README promises work on a fresh Debian 12 machine.
#   make demo   set everything up, then show netplug managing real bridges and a real guest
#   make test   set everything up, then run every test tier (unit, kernel, e2e, and the
#               VLAN-kernel tier: tests/vlankernel boots Debian's kernel under QEMU)
# Both need root: the kernel tier and the lab create network namespaces, bridges and taps.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-unit test-kernel test-e2e test-vlankernel deps host-packages bench clean deb

demo: deps
	$(PY) -m tests.lab.demo

test: deps
	NETPLUG_REQUIRE_ALL=1 $(PY) -m pytest tests

test-unit: deps
	$(PY) -m pytest tests/unit

test-kernel: deps
	$(PY) -m pytest tests/kernel

test-e2e: deps
	$(PY) -m pytest tests/e2e

test-vlankernel: deps
	$(PY) -m pytest tests/vlankernel

bench: deps
	$(PY) bench/hook_latency.py
	$(PY) bench/hook_floor.py
	$(PY) bench/restart_storm.py
	$(PY) bench/reconcile_scale.py
	$(PY) bench/rx_sync_latency.py
	$(PY) bench/libvirtd_restart.py

deps: host-packages $(STAMP)

host-packages:
	@scripts/setup-host.sh

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ needed, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[agent,test]'
	@touch $@

# The Debian package (dh-python/pybuild), built from the working tree into build/deb/.
deb:
	@scripts/build-deb.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
