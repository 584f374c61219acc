#!/usr/bin/env bash
# Make sure a Docker engine answers `docker info`; start one if not.
#
# Idempotent: exits 0 at once when the engine is already reachable. Otherwise
# installs docker.io (Debian) when dockerd is missing, starts dockerd in the
# background (log: var/dockerd.log) and waits up to $LSL_ENGINE_WAIT seconds
# (default 30). Needs root (or passwordless sudo) for installing and starting.
#
# Extra dockerd flags can be passed with DOCKERD_ARGS (e.g. "--iptables=false").
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
WAIT="${LSL_ENGINE_WAIT:-30}"
LOG="$ROOT/var/dockerd.log"

say() { echo "engine: $*"; }
die() { echo "engine: ERROR: $*" >&2; exit 1; }

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    say "Docker engine already reachable"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        die "the Docker engine is not reachable and starting one needs root. Run: sudo bash scripts/engine.sh   (or start dockerd yourself)"
    fi
fi

if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "dockerd is not installed and apt-get is not available to install it"
    say "installing docker.io"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q >/dev/null || die "apt-get update failed"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io >/dev/null \
        || die "apt-get install docker.io failed"
fi

# dockerd needs cgroups. Minimal VMs/containers without systemd may boot with
# nothing mounted on /sys/fs/cgroup: mount the v1 hierarchies the way Debian's
# /etc/init.d/docker does (cgroupfs-mount), unless cgroup v2 is already there.
if [ ! -e /sys/fs/cgroup/cgroup.controllers ] && [ ! -d /sys/fs/cgroup/devices ]; then
    if ! command -v cgroupfs-mount >/dev/null 2>&1; then
        say "no cgroups mounted; installing cgroupfs-mount"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends cgroupfs-mount >/dev/null \
            || { $SUDO apt-get update -q >/dev/null && \
                 $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends cgroupfs-mount >/dev/null; } \
            || die "no cgroups are mounted on /sys/fs/cgroup and cgroupfs-mount could not be installed"
    fi
    say "mounting cgroups (cgroupfs-mount)"
    $SUDO cgroupfs-mount || die "cgroupfs-mount failed; mount cgroups on /sys/fs/cgroup and retry"
fi

mkdir -p "$ROOT/var"
say "starting dockerd (log: var/dockerd.log)"
# setsid: dockerd gets a session (and process group) of its own, so it outlives whoever started
# it: a CI step, a terminal or a tool that kills its job's whole process group when it ends (each
# of those took the engine, and every container with it, down with them).
SETSID=""
command -v setsid >/dev/null 2>&1 && SETSID="setsid"
# shellcheck disable=SC2086  # DOCKERD_ARGS is a list of flags on purpose
nohup $SUDO $SETSID dockerd ${DOCKERD_ARGS:-} >>"$LOG" 2>&1 </dev/null &
DOCKERD_PID=$!

for _ in $(seq 1 "$((WAIT * 2))"); do
    if docker info >/dev/null 2>&1; then
        say "Docker engine is up ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'), pid $DOCKERD_PID)"
        exit 0
    fi
    if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
        echo "engine: dockerd exited early; last lines of var/dockerd.log:" >&2
        tail -n 20 "$LOG" >&2 || true
        die "could not start dockerd"
    fi
    sleep 0.5
done

echo "engine: last lines of var/dockerd.log:" >&2
tail -n 20 "$LOG" >&2 || true
die "dockerd did not answer 'docker info' within ${WAIT}s"
