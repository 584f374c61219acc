#!/usr/bin/env bash
# Make this machine ready to run LSL (`machine.sh run`) or its test suite (`machine.sh test`).
#
#   run:  system packages to build and serve (python venv, node/npm, gcc + static libc for
#         the keeper, docker.io) and a running Docker engine (scripts/engine.sh)
#   test: the same, plus what the suite drives for real: redis-server, chromium +
#         chromedriver, tmux, busybox-static/debootstrap/docker-registry for the
#         offline test images (scripts/build_test_images.sh), and those images; nginx
#         (tests/proxy.py), openssl and openssh (TLS and ssh:// nodes: tests/engines.py).
#         PostgreSQL and docker-compose are installed by scripts/postgres.sh and
#         scripts/compose_smoke.sh when their targets run
#
# `make run` and `make test` call it, so on a bare Debian machine the README's two
# commands are all there is to do. Idempotent and quick when everything is there.
# Installing needs root (or passwordless sudo); without it, it prints the exact command
# to run and fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PROFILE="${1:-test}"
export DEBIAN_FRONTEND=noninteractive
export NEEDRESTART_MODE=l   # never let needrestart restart services from apt

RUN_PACKAGES=(docker.io gcc libc6-dev make curl ca-certificates iproute2)
TEST_PACKAGES=(busybox-static redis-server docker-registry debootstrap chromium chromium-driver tmux fonts-liberation nginx openssl openssh-client openssh-server)

case "$PROFILE" in
    run) PACKAGES=("${RUN_PACKAGES[@]}") ;;
    test) PACKAGES=("${RUN_PACKAGES[@]}" "${TEST_PACKAGES[@]}") ;;
    *) echo "usage: $0 run|test" >&2; exit 2 ;;
esac

say() { echo "machine: $*"; }
die() { echo "machine: ERROR: $*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
fi
can_install() { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }

missing_packages() {
    local p out=()
    if command -v dpkg-query >/dev/null 2>&1; then
        for p in "${PACKAGES[@]}"; do
            dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || out+=("$p")
        done
    fi
    # A Python that can create virtualenvs (Debian splits ensurepip into python3-venv), node and npm
    # (preinstalled on CI machines, from Debian otherwise).
    local py
    py="$(command -v python3.11 || command -v python3 || true)"
    if [ -z "$py" ]; then out+=(python3 python3-venv)
    elif ! "$py" -c 'import ensurepip, venv' 2>/dev/null; then out+=(python3-venv); fi
    command -v node >/dev/null 2>&1 || out+=(nodejs)
    command -v npm >/dev/null 2>&1 || out+=(npm)
    echo "${out[@]}"
}

install_packages() {
    local missing
    missing="$(missing_packages)"
    if [ -z "$missing" ]; then
        say "system packages present ($PROFILE)"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "missing: $missing (install them; this script knows only apt-get)"
    can_install || die "missing: $missing. Run: sudo apt-get install -y $missing   (or run 'make $PROFILE' as root)"
    say "installing: $missing"
    # Keep package installs from auto-starting services (dockerd, redis, the system registry on
    # :5000): LSL starts what it needs itself.
    local policy=/usr/sbin/policy-rc.d added="" rc=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod 0755 "$policy"
        added=1
    fi
    $SUDO apt-get update -q || rc=$?
    # shellcheck disable=SC2086  # word-splitting the package list on purpose
    [ "$rc" -ne 0 ] || $SUDO env DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=l \
        apt-get install -y -q --no-install-recommends $missing || rc=$?
    [ -z "$added" ] || $SUDO rm -f "$policy"
    [ "$rc" -eq 0 ] || die "installing $missing failed (exit $rc)"
}

install_packages
bash scripts/engine.sh
if [ "$PROFILE" = test ]; then
    bash scripts/build_test_images.sh
    echo "machine: node $(node --version), $(docker version --format 'engine {{.Server.Version}} (API {{.Server.APIVersion}})'), $(redis-server --version | cut -d' ' -f3), $(chromium --version 2>/dev/null || echo 'chromium ?')"
fi
