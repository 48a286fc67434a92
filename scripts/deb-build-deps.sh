#!/bin/sh
# The Debian packages `make deb` and its test need (idempotent; run as root): Debian's Python
# packaging tools (debhelper, dh-python, pybuild's pyproject plugin), bash-completion's
# debhelper addon, lintian to check the result.
set -eu
PKGS="debhelper dh-python python3-all python3-setuptools pybuild-plugin-pyproject
bash-completion lintian dpkg-dev"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "deb-build-deps: installing:$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing >/dev/null
fi
