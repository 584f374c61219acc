# LSL server image: the web processes (daphne), the worker and the one-shot migrations of
# docker-compose.yml all run it.
#
#   docker compose up --build -d                                   # public base images
#   LSL_BASE_IMAGE=lsl-test/debian:bookworm docker-compose build   # any Debian bookworm image instead
#
# Base images are build arguments (PYTHON_IMAGE, NODE_IMAGE, DEBIAN_IMAGE; docker-compose.yml sets all
# three to LSL_BASE_IMAGE when that is given). Each stage runs deploy/base/lsl-ensure, which installs from
# Debian packages only what its base lacks: nothing on the public images, python3/nodejs/npm/gcc on a
# plain Debian. Layers go from the least to the most often changed, so a code change rebuilds only the
# last few COPYs.
#
# The server drives the host's Docker engine through /var/run/docker.sock, which the compose file
# mounts; see the warning there.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG NODE_IMAGE=node:20-slim
ARG DEBIAN_IMAGE=debian:bookworm-slim

# --- browser assets (xterm.js, asciinema-player, uPlot) and the server's terminal emulator ---------
FROM ${NODE_IMAGE} AS assets
COPY deploy/base/lsl-ensure deploy/base/lsl-fetch /usr/local/bin/
RUN lsl-ensure node npm
WORKDIR /src/frontend
COPY frontend/package.json frontend/package-lock.json ./
ARG LSL_BUILD_CA=""
RUN lsl-fetch npm ci --no-audit --no-fund --loglevel=error
COPY frontend/build.mjs ./
COPY frontend/src ./src
COPY sessions/emulator/emulator.js /src/sessions/emulator/emulator.js
RUN node build.mjs
# The official node image's /usr/local/bin/node is self-contained (glibc, libstdc++): the server stage
# takes it as is. Debian's /usr/bin/node needs its shared libraries, so there the server stage installs
# Debian's nodejs instead (/out stays empty).
RUN mkdir -p /out && if [ "$(command -v node)" = /usr/local/bin/node ]; then cp /usr/local/bin/node /out/; fi

# --- the session keeper: one static binary, copied into every environment ---------------------------
FROM ${DEBIAN_IMAGE} AS keeper
COPY deploy/base/lsl-ensure /usr/local/bin/
RUN lsl-ensure gcc
COPY scripts/build_keeper.sh /src/scripts/
COPY environments/keeper/keeper.c /src/environments/keeper/
RUN sh /src/scripts/build_keeper.sh

# --- the documentation website (served at /docs/), built --strict as in CI ---------------------------
FROM ${PYTHON_IMAGE} AS docs
COPY deploy/base/lsl-ensure deploy/base/lsl-fetch /usr/local/bin/
RUN lsl-ensure python && python3 -m venv /opt/mkdocs
WORKDIR /src
COPY requirements-dev.txt ./
ARG LSL_BUILD_CA=""
# The MkDocs version is pinned once, in requirements-dev.txt (the other dev/test packages are not needed).
RUN lsl-fetch /opt/mkdocs/bin/pip install --no-cache-dir --disable-pip-version-check -q \
        "$(grep -E '^mkdocs==' requirements-dev.txt | cut -d' ' -f1)"
COPY mkdocs.yml ./
COPY docs ./docs
COPY docs_theme ./docs_theme
RUN /opt/mkdocs/bin/mkdocs build --strict --quiet

# --- server ------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LSL_VAR_DIR=/var/lib/lsl \
    PATH=/opt/lsl/bin:$PATH
COPY deploy/base/lsl-ensure deploy/base/lsl-fetch /usr/local/bin/
# The sessions' screen model runs xterm.js headless in a node child process (one file, no node_modules).
COPY --from=assets /out/ /usr/local/bin/
RUN lsl-ensure python node ssh && python3 -m venv /opt/lsl
WORKDIR /app
COPY requirements.txt ./
ARG LSL_BUILD_CA=""
RUN lsl-fetch pip install -q -r requirements.txt
COPY --from=keeper /src/environments/keeper/lsl-keeper /app/environments/keeper/lsl-keeper
COPY --from=docs /src/site /app/site
COPY --from=assets /src/frontend/static/frontend/dist /app/frontend/static/frontend/dist
COPY --from=assets /src/sessions/emulator/dist /app/sessions/emulator/dist
# Application source: only what the server needs (.dockerignore keeps build outputs, var/ with its
# secret key and SQLite database, the venv and node_modules out). A new top-level Django app must be
# added here.
COPY manage.py ./
COPY catalog ./catalog
COPY lsl ./lsl
COPY lsl_site ./lsl_site
COPY accounts ./accounts
COPY sessions ./sessions
COPY frontend ./frontend
COPY environments ./environments
COPY deploy/healthcheck.py ./deploy/healthcheck.py
# var/: generated secret key (unless LSL_SECRET_KEY is set), SQLite fallback DB.
RUN mkdir -p /var/lib/lsl
VOLUME /var/lib/lsl
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 CMD ["python", "deploy/healthcheck.py", "web"]
# Runs as root: it needs the Docker socket anyway, which is root-equivalent.
# The web role by default; docker-compose.yml runs the worker (manage.py lsl_worker) and the one-shot
# migrations (manage.py migrate, lsl_apply) from the same image.
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "lsl_site.asgi:application"]
