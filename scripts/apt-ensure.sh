#!/bin/sh
# Install those of the named Debian packages that are missing (idempotent; run as root).
# Usage: scripts/apt-ensure.sh WHO PACKAGE...   WHO prefixes the one line said on stderr.
set -eu
who=$1
shift
missing=""
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "$who: installing:$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing >/dev/null
else
    echo "$who: Debian packages present" >&2
fi
