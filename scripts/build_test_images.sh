#!/usr/bin/env bash
# Build the offline test images used by the test suite (no registry needed):
#
#   lsl-test/busybox:latest   busybox-static rootfs (a few MB, instant)
#   lsl-test/debian:bookworm  debootstrap minbase + sudo procps bash coreutils
#                             python3-minimal less vim-tiny ca-certificates (~30 s
#                             the first time; the rootfs tarball is cached in
#                             var/cache/debian-bookworm-<packages key>.tar
#                             so a rebuild after `docker rmi` is instant)
#
# Idempotent: an image that already exists (for Debian: built from the current
# package list, its lsl.test.packages label) is left
# alone. Prints one line per image: built / present.
# Needs root (or passwordless sudo) only to install busybox-static/debootstrap
# and to run debootstrap. Mirror override: LSL_DEBIAN_MIRROR.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
CACHE="$ROOT/var/cache"
MIRROR="${LSL_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BUSYBOX_IMAGE="lsl-test/busybox:latest"
DEBIAN_IMAGE="lsl-test/debian:bookworm"
# What the default catalog's Debian template installs at first start (catalog/default.yaml), so the
# tests can run that template offline with this image standing in for debian:bookworm.
DEBIAN_PACKAGES="sudo,procps,bash,coreutils,python3-minimal,less,vim-tiny,ca-certificates"
# The cached rootfs and the image are both keyed by the package list: change it and both are rebuilt.
PACKAGES_KEY="$(printf '%s' "$DEBIAN_PACKAGES" | sha256sum | cut -c1-12)"
DEBIAN_TAR="$CACHE/debian-bookworm-$PACKAGES_KEY.tar"

die() { echo "build_test_images: ERROR: $*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
fi

docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (run: bash scripts/engine.sh)"

APT_UPDATED=""
apt_install() {  # apt_install PACKAGE...
    command -v apt-get >/dev/null 2>&1 || die "need $* but apt-get is not available"
    if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
        die "need $* installed (run as root to install it automatically)"
    fi
    if [ -z "$APT_UPDATED" ]; then
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null \
        || die "apt-get install $* failed"
}

have_image() {
    [ "$1" = "$DEBIAN_IMAGE" ] || { docker image inspect "$1" >/dev/null 2>&1; return; }
    [ "$(docker image inspect --format '{{index .Config.Labels "lsl.test.packages"}}' "$1" 2>/dev/null)" = "$PACKAGES_KEY" ]
}

WORK=""
cleanup() {
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        $SUDO rm -rf "$WORK"
    fi
}
trap cleanup EXIT

mkdir -p "$CACHE"

# --- lsl-test/busybox:latest --------------------------------------------------
build_busybox() {
    local bb=""
    for candidate in /bin/busybox /usr/bin/busybox; do
        # Only the static build works inside an image with no libc.
        if [ -x "$candidate" ] && ! ldd "$candidate" >/dev/null 2>&1; then bb="$candidate"; break; fi
    done
    if [ -z "$bb" ]; then
        apt_install busybox-static
        bb=/bin/busybox
    fi
    WORK="$(mktemp -d "$CACHE/busybox-rootfs.XXXXXX")"
    local rootfs="$WORK/rootfs"
    mkdir -p "$rootfs"/{bin,etc,root,tmp,workspace,usr/bin,home,dev,proc,sys}
    cp "$bb" "$rootfs/bin/busybox"
    chmod 0755 "$rootfs/bin/busybox"
    # Same result as `busybox --install -s bin`, but with relative links so they
    # resolve inside the image (--install would point at the host's path).
    local applet
    for applet in $("$bb" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$rootfs/bin/$applet"
    done
    ln -sf ../../bin/busybox "$rootfs/usr/bin/env"   # for '#!/usr/bin/env' scripts
    printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' \
        'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >"$rootfs/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' >"$rootfs/etc/group"
    chmod 1777 "$rootfs/tmp"
    chmod 0700 "$rootfs/root"
    tar --numeric-owner --owner=0 --group=0 -C "$rootfs" -c . \
        | docker import --change 'CMD ["/bin/sh"]' - "$BUSYBOX_IMAGE" >/dev/null
    rm -rf "$WORK"; WORK=""
}

# --- lsl-test/debian:bookworm -------------------------------------------------
build_debian_tar() {
    if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
        die "debootstrap needs root: run as root, or put a rootfs tarball at $DEBIAN_TAR"
    fi
    command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || apt_install debootstrap
    WORK="$(mktemp -d "$CACHE/debian-rootfs.XXXXXX")"
    local rootfs="$WORK/rootfs" t0=$SECONDS
    echo "debootstrap bookworm from $MIRROR (~30-60 s)..."
    if ! $SUDO env PATH="/usr/sbin:/sbin:$PATH" debootstrap --variant=minbase --include="$DEBIAN_PACKAGES" \
            bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
        tail -n 30 "$WORK/debootstrap.log" >&2
        [ -f "$rootfs/debootstrap/debootstrap.log" ] && tail -n 30 "$rootfs/debootstrap/debootstrap.log" >&2
        die "debootstrap failed"
    fi
    # Slim it down: package lists/caches and docs are useless in a test image;
    # hostname/resolv.conf are the build host's (docker bind-mounts its own).
    $SUDO sh -c "cd '$rootfs' && rm -rf var/lib/apt/lists/* var/cache/apt/* var/cache/debconf/*-old \
        var/log/*.log usr/share/doc/* usr/share/man/* usr/share/info/* etc/hostname etc/resolv.conf \
        && mkdir -p workspace && chmod 1777 tmp"
    $SUDO tar --numeric-owner -C "$rootfs" \
        --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' --exclude='./run/*' \
        -cf "$DEBIAN_TAR.tmp" .
    $SUDO chown "$(id -u):$(id -g)" "$DEBIAN_TAR.tmp"
    mv -f "$DEBIAN_TAR.tmp" "$DEBIAN_TAR"
    $SUDO rm -rf "$WORK"; WORK=""
    echo "debootstrap done in $((SECONDS - t0)) s ($(du -h "$DEBIAN_TAR" | cut -f1) cached in ${DEBIAN_TAR#"$ROOT"/})"
}

build_debian() {
    [ -s "$DEBIAN_TAR" ] || build_debian_tar
    docker import \
        --change 'CMD ["/bin/bash"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change "LABEL lsl.test.packages=$PACKAGES_KEY" \
        "$DEBIAN_TAR" "$DEBIAN_IMAGE" >/dev/null
}

for image in "$BUSYBOX_IMAGE" "$DEBIAN_IMAGE"; do
    if have_image "$image"; then
        echo "$image: present"
        continue
    fi
    t0=$SECONDS
    case "$image" in
        "$BUSYBOX_IMAGE") build_busybox ;;
        "$DEBIAN_IMAGE") build_debian ;;
    esac
    echo "$image: built ($((SECONDS - t0)) s)"
done
