# LSL developer tasks.   make run | make test | make images | make bench
#
# Everything runs from the project's own virtualenv (.venv); the stamp files
# keep `pip install` / `npm ci` from re-running unless their inputs changed.

SHELL := /bin/bash
PY ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null || echo python3)
VENV := .venv
VPY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
NPM_STAMP := frontend/node_modules/.installed
ASSETS_STAMP := frontend/static/frontend/dist/.built
PYTEST_ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8000

KEEPER := environments/keeper/lsl-keeper

.PHONY: help machine-run machine-test venv assets keeper docs migrate run images engine bench test test-postgres compose-smoke clean distclean

help:
	@echo "make run        set up (venv, assets, migrate, catalog, admin) and serve on http://$(HOST):$(PORT)/ (web + worker)"
	@echo "make test       run the test suite (PYTEST_ARGS='-k foo' to filter)"
	@echo "make test-postgres  the same suite on PostgreSQL (a test cluster of its own: scripts/postgres.sh)"
	@echo "make compose-smoke  build docker-compose.yml offline, bring it up, smoke-test it through its proxy, tear it down"
	@echo "make images     build the offline test images (lsl-test/busybox, lsl-test/debian)"
	@echo "make engine     start a Docker engine if none is reachable (needs root)"
	@echo "make bench      terminal latency/throughput and create-to-prompt benchmarks"
	@echo "make docs       build the documentation website from docs/ (MkDocs, --strict) into site/; served at /docs/"
	@echo "make venv | assets | keeper | migrate | clean | distclean"

# --- The machine: system packages, the Docker engine, the offline test images --------
# Installs what is missing when run as root (or with passwordless sudo); otherwise says what to run.
machine-run:
	bash scripts/machine.sh run

machine-test:
	bash scripts/machine.sh test

# --- Python -------------------------------------------------------------------
venv: $(VENV_STAMP)

$(VENV_STAMP): requirements.txt requirements-dev.txt
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $@

# --- Browser assets -------------------------------------------------------------
assets: $(ASSETS_STAMP)

$(NPM_STAMP): frontend/package-lock.json frontend/package.json
	cd frontend && npm ci --no-audit --no-fund
	@touch $@

# build.mjs wipes dist/ first, so the stamp inside it disappears with it.
$(ASSETS_STAMP): $(NPM_STAMP) frontend/build.mjs $(wildcard frontend/src/*.js) sessions/emulator/emulator.js
	cd frontend && node build.mjs
	@touch $@

# --- The session keeper (a static binary copied into every environment) ------------
keeper: $(KEEPER)

$(KEEPER): environments/keeper/keeper.c scripts/build_keeper.sh
	bash scripts/build_keeper.sh

# --- The documentation website (served by LSL at /docs/; docker-compose's `docs` service) ----
# --strict: a broken link or anchor, or a page missing from the nav, fails the build (and so `make test`).
# mkdocs wipes site/ first and rewrites site/index.html, which is therefore the stamp.
DOCS_STAMP := site/index.html

docs: $(DOCS_STAMP)

$(DOCS_STAMP): $(VENV_STAMP) mkdocs.yml $(wildcard docs/*.md) $(wildcard docs_theme/*.html docs_theme/*/*)
	$(VENV)/bin/mkdocs build --strict --quiet

# --- Server -------------------------------------------------------------------
migrate: venv
	$(VPY) manage.py migrate --noinput

run: machine-run venv assets keeper docs migrate
	$(VPY) manage.py lsl_apply catalog/default.yaml
	$(VPY) manage.py lsl_ensure_admin --url http://$(HOST):$(PORT)/
	exec $(VPY) manage.py lsl_run --host $(HOST) --port $(PORT)   # daphne + the worker; Ctrl-C stops both

# --- Docker helpers -------------------------------------------------------------
engine:
	bash scripts/engine.sh

images:
	bash scripts/build_test_images.sh

# --- Checks -------------------------------------------------------------------
test: machine-test venv assets keeper docs
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# The whole suite again, on PostgreSQL: scripts/postgres.sh installs it if missing, starts a test
# cluster of its own (127.0.0.1:5433, never the machine's `main` one) and prints its URL;
# pytest-django creates test_lsl there and drops it at the end. Two steps, so that a failing
# postgres.sh stops here instead of leaving LSL_DATABASE_URL empty (which would mean SQLite).
# The cluster keeps running afterwards (a re-run starts in a second): `bash scripts/postgres.sh stop`.
test-postgres: machine-test venv assets keeper docs
	url="$$(bash scripts/postgres.sh)" && LSL_DATABASE_URL="$$url" $(VENV)/bin/pytest -q $(PYTEST_ARGS)

# docker-compose.yml for real: proxy, web x2, worker, PostgreSQL, Redis (scripts/compose_smoke.sh).
compose-smoke: machine-test venv
	bash scripts/compose_smoke.sh

bench: venv assets keeper
	$(VPY) bench/terminal.py
	$(VPY) bench/create.py

clean:
	rm -rf frontend/static/frontend/dist sessions/emulator/dist frontend/node_modules .pytest_cache $(KEEPER) site
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Also drops the virtualenv and the cached Debian rootfs (keeps var/ data).
distclean: clean
	rm -rf $(VENV) var/cache
