"""The user an environment's shells run as: its owner's name, uid and gid.

At first start LSL runs `ENSURE_USER_SCRIPT` as root in the container. It is
idempotent and portable: it uses useradd/groupadd (Debian, Fedora, Arch...),
else adduser/addgroup (Alpine), else edits /etc/passwd and /etc/group directly
(BusyBox images without either). It prints the identity it settled on as
`LSL-IDENTITY name uid gid home`, which LSL records on the environment.
"""

from __future__ import annotations

from typing import Any

from accounts.models import Profile

# Arguments: name uid gid shell sudo(0|1) chown-target...
ENSURE_USER_SCRIPT = r'''
set -u
name="$1"; uid="$2"; gid="$3"; shell="$4"; sudo="$5"; shift 5
[ -x "$shell" ] || shell=/bin/sh
have() { command -v "$1" >/dev/null 2>&1; }
field() { awk -F: -v k="$2" -v c="$3" -v r="$4" '$c == k { print $r; exit }' "$1" 2>/dev/null; }

# The group: reuse one that already has the gid; else create it (under another name if ours is taken).
group="$(field /etc/group "$gid" 3 1)"
if [ -z "$group" ]; then
  group="$name"
  [ -n "$(field /etc/group "$group" 1 1)" ] && group="lsl$gid"
  if have groupadd; then groupadd -g "$gid" "$group"
  elif have addgroup && addgroup --help 2>&1 | grep -q -- '-g'; then addgroup -g "$gid" "$group"
  else echo "$group:x:$gid:" >> /etc/group
  fi || { echo "cannot create group $group ($gid)" >&2; exit 1; }
fi

# The user: reuse an account that already has the uid (e.g. in a snapshot); else create it.
user="$(field /etc/passwd "$uid" 3 1)"
if [ -z "$user" ]; then
  user="$name"
  [ -n "$(field /etc/passwd "$user" 1 1)" ] && user="lsl$uid"
  home="/home/$user"
  mkdir -p /home
  if have useradd; then useradd -M -N -u "$uid" -g "$gid" -d "$home" -s "$shell" "$user"
  elif have adduser && adduser --help 2>&1 | grep -q -- '-G'; then adduser -D -H -u "$uid" -G "$group" -h "$home" -s "$shell" "$user"
  else
    echo "$user:x:$uid:$gid:LSL user:$home:$shell" >> /etc/passwd
    [ -w /etc/shadow ] && echo "$user:!:19000:0:99999:7:::" >> /etc/shadow
    true
  fi || { echo "cannot create user $user ($uid)" >&2; exit 1; }
fi
home="$(field /etc/passwd "$uid" 3 6)"
[ -n "$home" ] || home="/home/$user"
if [ ! -d "$home" ]; then
  mkdir -p "$home"
  [ -d /etc/skel ] && cp -a /etc/skel/. "$home/" 2>/dev/null
  chown -R "$uid:$gid" "$home"
  chmod 0750 "$home"
fi

# Passwordless sudo where the template allows it (and nowhere else: remove a stale drop-in).
dropin="/etc/sudoers.d/lsl-$uid"
# The drop-in is written even before sudo is installed (a template's setup step may install it after
# this runs): the distributions' sudoers all include /etc/sudoers.d.
if [ "$sudo" = 1 ]; then
  mkdir -p /etc/sudoers.d
  printf '#%s ALL=(ALL:ALL) NOPASSWD: ALL\n' "$uid" > "$dropin.tmp" && chmod 0440 "$dropin.tmp" && mv "$dropin.tmp" "$dropin"
else
  rm -f "$dropin"
fi

# Directories the user must own: the workspace (fresh and root's, or copied from a snapshot of someone else's).
for dir in "$@"; do
  [ -d "$dir" ] && [ "$(stat -c %u "$dir" 2>/dev/null)" != "$uid" ] && chown -R -h "$uid:$gid" "$dir"
done
echo "LSL-IDENTITY $user $uid $gid $home"
'''

# Team volumes are shared by several users: their root is made world-writable and sticky (like /tmp).
SHARE_DIR_SCRIPT = r'''
for dir in "$@"; do
  [ -d "$dir" ] && [ "$(stat -c %u:%a "$dir" 2>/dev/null)" = "0:755" ] && chmod 1777 "$dir"
done
true
'''


def ensure_user_command(profile: Profile, *, shell: str, sudo: bool, owned_dirs: list[str]) -> list[str]:
    return ["/bin/sh", "-c", ENSURE_USER_SCRIPT, "lsl-ensure-user", profile.shell_name, str(profile.uid),
            str(profile.gid), shell, "1" if sudo else "0", *owned_dirs]


IDENTITY_DIR = "/.lsl/run"  # the keeper's socket directory (keeper.SOCKET_DIR_IN_CONTAINER), mounted from the host
IDENTITY_NAME = "identity"
IDENTITY_FILE = f"{IDENTITY_DIR}/{IDENTITY_NAME}"


def boot_command(profile: Profile, *, shell: str, sudo: bool, owned_dirs: list[str], keepalive: list[str]) -> list[str]:
    """The container's own command: make the user (ENSURE_USER_SCRIPT, as root, printing its
    LSL-IDENTITY line to the container's log), then become the keep-alive process.

    Doing it at start instead of in a `docker exec` afterwards saves an exec (~50 ms) on the way
    to the first prompt, and re-checks the user at every start (the script is idempotent).
    """
    keep = " ".join(f"'{part}'" for part in keepalive)
    # The LSL-IDENTITY line also goes to IDENTITY_FILE when its directory (the keeper's socket
    # directory, on the server's host) is there: a local file is read at once, where polling the
    # engine for the log took ~15 ms on the way to the first prompt.
    report = (f'out="$(sh -c "$0" lsl-ensure-user "$@")"; printf "%s\\n" "$out"; '
              f'[ -d {IDENTITY_DIR} ] && printf "%s\\n" "$out" > {IDENTITY_FILE}.tmp && mv {IDENTITY_FILE}.tmp {IDENTITY_FILE}; ')
    return ["/bin/sh", "-c", f"{report}exec {keep}", ENSURE_USER_SCRIPT,
            profile.shell_name, str(profile.uid), str(profile.gid), shell, "1" if sudo else "0", *owned_dirs]


def parse_identity(output: bytes) -> dict[str, Any] | None:
    for line in output.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] == "LSL-IDENTITY":
            return {"name": parts[1], "uid": int(parts[2]), "gid": int(parts[3]), "home": parts[4]}
    return None
