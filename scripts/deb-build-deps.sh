#!/bin/sh
# The Debian packages `make deb` and its test need (idempotent; run as root): Debian's Python
# packaging tools (debhelper, dh-python, pybuild's pyproject plugin), bash-completion's
# debhelper addon, lintian to check the result.
set -eu
PKGS="debhelper dh-python python3-all python3-setuptools pybuild-plugin-pyproject
bash-completion lintian dpkg-dev"
# shellcheck disable=SC2086
exec "$(dirname "$0")/apt-ensure.sh" deb-build-deps $PKGS
