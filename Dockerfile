# LSL server image (used by docker-compose.yml).
#
#   docker compose up --build
#
# The server drives the host's Docker engine through /var/run/docker.sock,
# which the compose file mounts; see the warning there.

# --- browser assets (xterm.js, asciinema-player, uPlot) and the server's terminal emulator ---
FROM node:20-slim AS assets
WORKDIR /src/frontend
COPY frontend/package.json frontend/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY frontend/build.mjs ./
COPY frontend/src ./src
COPY sessions/emulator/emulator.js /src/sessions/emulator/emulator.js
RUN node build.mjs

# --- the session keeper: one static binary, copied into every environment ---------
FROM debian:bookworm-slim AS keeper
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY environments/keeper/keeper.c scripts/build_keeper.sh /src/
RUN gcc -static -O2 -Wall -Wextra -Werror -o /src/lsl-keeper /src/keeper.c && strip /src/lsl-keeper

# --- the documentation website (served at /docs/), built --strict as in CI ------------
FROM python:3.11-slim AS docs
WORKDIR /src
COPY requirements-dev.txt ./
RUN pip install --no-cache-dir "$(grep -E '^mkdocs==' requirements-dev.txt | cut -d' ' -f1)"
COPY mkdocs.yml ./
COPY docs ./docs
COPY docs_theme ./docs_theme
RUN mkdocs build --strict

# --- application source, without local build/dev leftovers ----------------------
# Only what the server needs is copied (so the local .venv, var/ with its
# secret key and SQLite DB, .git, node_modules never reach the image).
# A new top-level Django app must be added to this list.
FROM python:3.11-slim AS source
COPY manage.py /src/
COPY lsl_site /src/lsl_site
COPY lsl /src/lsl
COPY accounts /src/accounts
COPY environments /src/environments
COPY sessions /src/sessions
COPY frontend /src/frontend
COPY catalog /src/catalog
RUN rm -rf /src/frontend/node_modules /src/frontend/static/frontend/dist /src/sessions/emulator/dist \
 && find /src -name __pycache__ -type d -prune -exec rm -rf {} +

# --- server ---------------------------------------------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LSL_VAR_DIR=/var/lib/lsl
WORKDIR /app
COPY requirements.txt ./
RUN pip install -r requirements.txt
COPY --from=source /src /app
COPY --from=assets /src/frontend/static/frontend/dist /app/frontend/static/frontend/dist
# The sessions' screen model runs xterm.js headless in a node child process (one file, no node_modules).
COPY --from=assets /usr/local/bin/node /usr/local/bin/node
COPY --from=assets /src/sessions/emulator/dist /app/sessions/emulator/dist
COPY --from=keeper /src/lsl-keeper /app/environments/keeper/lsl-keeper
COPY --from=docs /src/site /app/site
# var/: generated secret key (unless LSL_SECRET_KEY is set), SQLite fallback DB.
RUN mkdir -p /var/lib/lsl
VOLUME /var/lib/lsl
EXPOSE 8000
# Runs as root: it needs the Docker socket anyway, which is root-equivalent.
CMD ["sh", "-c", "python manage.py migrate --noinput && python manage.py lsl_apply \"${LSL_CATALOG:-catalog/default.yaml}\" && exec daphne -b 0.0.0.0 -p 8000 lsl_site.asgi:application"]
