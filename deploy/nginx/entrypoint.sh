#!/bin/sh
# Writes what deploy/nginx/lsl.conf includes, then runs nginx (or whatever command was given).
#   lsl-main.conf    the user nginx's workers run as: `nginx` (official image) or `www-data` (Debian)
#   lsl-limits.conf  client_max_body_size from LSL_MAX_UPLOAD_BYTES, the largest body LSL accepts (its
#                    file-transfer upload; 0: no limit); daphne answers a body too large for its
#                    route with a JSON 413 before reading it (lsl_site/httpserver.py)
#   lsl-server.conf  with LSL_PROXY_UPSTREAM_HEADER=1, every response (websocket handshakes too) names
#                    the web process that served it: X-LSL-Upstream: <address:port>. For tests and
#                    load-balancing checks; off by default (it shows internal addresses).
set -eu
limit="${LSL_MAX_UPLOAD_BYTES:-10737418240}"
case "$limit" in
    ''|*[!0-9]*) echo "LSL_MAX_UPLOAD_BYTES=$limit is not a number of bytes" >&2; exit 1 ;;
esac
echo "client_max_body_size $limit;" > /etc/nginx/lsl-limits.conf
case "${LSL_PROXY_UPSTREAM_HEADER:-0}" in
    1|true|yes|on) echo 'add_header X-LSL-Upstream $upstream_addr always;' > /etc/nginx/lsl-server.conf ;;
    *) : > /etc/nginx/lsl-server.conf ;;
esac
for user in nginx www-data nobody; do
    if id "$user" >/dev/null 2>&1; then
        echo "user $user $(id -gn "$user");" > /etc/nginx/lsl-main.conf
        break
    fi
done
exec "$@"
