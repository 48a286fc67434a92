#!/bin/bash
# `make deb`: build the Debian package from the working tree with Debian's Python tooling
# (dh-python, pybuild). The tree is copied (tracked and new files, .gitignore honoured) to
# build/deb/src; the .deb and its .buildinfo/.changes land in build/deb/. Prints the .deb's path.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deb-build-deps.sh
out=build/deb
rm -rf "$out"
mkdir -p "$out/src"
git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    tar --null -T - -cf - | tar -xf - -C "$out/src"
# The system's Python (Debian's tools build for /usr/bin/python3), whatever else is on PATH.
(cd "$out/src" && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b \
    >../build.log 2>&1) || {
    tail -40 "$out/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed; full log: $out/build.log" >&2
    exit 1
}
ls "$PWD/$out"/*.deb
