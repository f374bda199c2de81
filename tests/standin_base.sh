#!/usr/bin/env bash
# Builds a stand-in for the Dockerfile's base image where no registry can be reached: a minimal Debian bookworm
# root filesystem from the Debian mirror (debootstrap), imported into the local engine under the base's exact name.
# The official debian:*-slim images are made the same way (a minbase bookworm rootfs with deb822 sources for the
# main, updates and security suites), so the Dockerfile's own steps (apt-get, pip) run on it unchanged.
#
#   tests/standin_base.sh IMAGE [MIRROR]      e.g. tests/standin_base.sh debian:bookworm-20250520-slim
set -euo pipefail
image=$1
mirror=${2:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}
root=$(mktemp -d /tmp/reskd-standin.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase bookworm "$root/rootfs" "$mirror" >"$root/debootstrap.log" 2>&1 || {
    tail -20 "$root/debootstrap.log" >&2
    echo "debootstrap of bookworm from $mirror failed" >&2
    exit 1
}
rm -f "$root/rootfs/etc/apt/sources.list"
cat >"$root/rootfs/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: ${mirror}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror}-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
rm -rf "$root"/rootfs/var/lib/apt/lists/* "$root"/rootfs/var/cache/apt/archives/*.deb
tar -C "$root/rootfs" -c . | "$docker" import --change 'CMD ["bash"]' - "$image" >/dev/null
echo "imported $image"
