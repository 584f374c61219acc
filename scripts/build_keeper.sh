#!/bin/sh
# Build the session keeper (environments/keeper/keeper.c) as one static binary that runs in any
# container, glibc, musl or BusyBox alike. LSL copies it into each environment (see
# environments/keeper.py). Needs gcc and a static libc (Debian: gcc, libc6-dev).
set -eu
cd "$(dirname "$0")/.."
src=environments/keeper/keeper.c
out=${1:-environments/keeper/lsl-keeper}
if [ -x "$out" ] && [ "$out" -nt "$src" ]; then exit 0; fi
${CC:-gcc} -static -O2 -Wall -Wextra -Werror -o "$out.tmp" "$src"
strip "$out.tmp" 2>/dev/null || true
mv "$out.tmp" "$out"
echo "built $out ($(wc -c < "$out") bytes)"
