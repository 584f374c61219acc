"""LSL settings: everything comes from LSL_* environment variables.

Defaults make `make run` work with nothing configured: SQLite in var/, the
in-memory channel layer and a local-memory cache. Setting LSL_DATABASE_URL or
LSL_REDIS_URL switches to PostgreSQL / Redis (docker-compose.yml wires both).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from lsl_site.env import env_bool, env_float, env_int, env_list, env_paths, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("LSL_VAR_DIR", str(BASE_DIR / "var"))).resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)

LSL_VERSION = "0.1.0"

DEBUG = env_bool("LSL_DEBUG", False)


def _secret_key() -> str:
    """LSL_SECRET_KEY, or one generated once into var/ so dev restarts keep sessions."""
    key = env_str("LSL_SECRET_KEY")
    if key:
        return key
    key_file = VAR_DIR / "secret_key"
    if key_file.exists():
        return key_file.read_text().strip()
    key = secrets.token_urlsafe(50)
    key_file.write_text(key)
    key_file.chmod(0o600)
    return key


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("LSL_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("LSL_CSRF_TRUSTED_ORIGINS", [])
# Behind a TLS-terminating proxy that sets X-Forwarded-Proto (docker-compose.yml's nginx passes on the
# value a proxy in front of it set, else its own scheme): request.is_secure() and request.scheme follow
# the client's scheme, so the wss:// and preview URLs the API hands out and Django's CSRF checks match
# what the browser used. Only behind such a proxy: a client reaching daphne directly could claim https.
if env_bool("LSL_TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Request bodies (lsl_site/httpserver.py): a larger one gets a 413 before it is read. The file-transfer
# upload is spooled to a temporary file and handed over a chunk at a time, so it may be larger (0: no limit).
LSL_MAX_REQUEST_BYTES = env_int("LSL_MAX_REQUEST_BYTES", 8 * 1024 * 1024, minimum=1024)
LSL_MAX_UPLOAD_BYTES = env_int("LSL_MAX_UPLOAD_BYTES", 10 * 1024**3, minimum=0)
DATA_UPLOAD_MAX_MEMORY_SIZE = LSL_MAX_REQUEST_BYTES  # Django's own check (request.body) agrees with the server's

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI served from here (/api/docs/): no CDN, works offline
    "guardian",
    "django_tasks",
    "django_tasks_db",
    "lsl_site",
    "accounts",
    "environments",
    "sessions.apps.TerminalSessionsConfig",
    "frontend",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "lsl_site.security.ContentSecurityPolicyMiddleware",  # django-csp + this host's websockets
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "lsl_site.urls"
ASGI_APPLICATION = "lsl_site.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Threads (each with its own database connection) that run the websocket consumers' and session
# hubs' queries (lsl_site/dbpool.py).
LSL_DB_THREADS = env_int("LSL_DB_THREADS", 4, minimum=1)
DATABASE_URL = env_str("LSL_DATABASE_URL", f"sqlite:///{VAR_DIR / 'lsl.sqlite3'}")
try:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
except ValueError as exc:
    raise ImproperlyConfigured(f"LSL_DATABASE_URL is not a valid database URL: {exc}") from None
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Background jobs and daphne workers write concurrently: wait for the lock
    # instead of failing, and take the write lock up front to avoid upgrade deadlocks.
    # WAL: the web process, the worker and their pollers read while one of them writes.
    DATABASES["default"]["OPTIONS"] = {"timeout": 30, "transaction_mode": "IMMEDIATE",
                                       "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL"}
    DATABASES["default"]["TEST"] = {"NAME": env_str("LSL_TEST_DATABASE", str(VAR_DIR / "test.sqlite3"))}

TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}

REDIS_URL = env_str("LSL_REDIS_URL")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "capacity": env_int("LSL_CHANNEL_CAPACITY", 1000, minimum=10)},
        }
    }
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer",
                                  "CONFIG": {"capacity": env_int("LSL_CHANNEL_CAPACITY", 1000, minimum=10)}}}
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "guardian.backends.ObjectPermissionBackend",
]
ANONYMOUS_USER_NAME = None  # guardian: no anonymous user object; anonymous sees nothing
GUARDIAN_RAISE_403 = False
GUARDIAN_AUTO_PREFETCH = False

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
# Served through the finders (WHITENOISE_USE_FINDERS) until someone runs collectstatic; WhiteNoise warns at
# every start when the directory is missing, so it exists from the first run.
STATIC_ROOT.mkdir(exist_ok=True)
# daphne serves no static files: WhiteNoise does, straight from the app dirs (no collectstatic step needed).
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Response headers against hostile pages and content (issue 12). Django's defaults, stated so that
# nobody loosens them by accident: SecurityMiddleware sends the first three, XFrameOptionsMiddleware the last.
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# Content-Security-Policy (django-csp; lsl_site/security.py adds ws:/wss: of the request's host). Scripts
# come only from this server's static files: templates carry no inline script or event handler. Styles
# allow 'unsafe-inline': xterm.js creates <style> elements at run time (and has no nonce option), and
# Swagger UI's page has a <style> block; CSS cannot run script, and the ways it could send data
# elsewhere (url() loads, fonts) are held to 'self' by img-src, font-src and connect-src.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'", "'unsafe-inline'"],
        "img-src": ["'self'", "data:"],  # Swagger UI's and Django admin's icons include data: SVGs
        "font-src": ["'self'"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    },
}
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.auth.APITokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "lsl_site.schema.AutoSchema",  # + every operation's error responses, the token scheme
    # The API speaks JSON (the CLI and the pages send nothing else): a form encoding cannot carry null, a
    # list or a nested object, so accepting one would make the schema's types a lie. Others get a 415.
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_PAGINATION_CLASS": "lsl_site.pagination.Pagination",  # limit/offset, at most 200 a page
    "PAGE_SIZE": 50,
    "DEFAULT_THROTTLE_CLASSES": [
        "lsl_site.throttling.AnonRateThrottle",  # fail open when Redis is down
        "lsl_site.throttling.UserRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "anon": env_str("LSL_THROTTLE_ANON", "60/min"),
        "user": env_str("LSL_THROTTLE_USER", "1200/min"),
        "login": env_str("LSL_THROTTLE_LOGIN", "10/min"),
        # Wrong credentials per client address (API tokens, websocket handshakes, the sign-in form); over it,
        # credentials from that address are refused unchecked (429) until the window ends (accounts/auth.py).
        "auth_failures": env_str("LSL_THROTTLE_AUTH_FAILURES", "20/min"),
    },
    # The client address of a throttle is REMOTE_ADDR unless LSL_NUM_PROXIES trusted proxies append to
    # X-Forwarded-For; trusting the header by default would let any caller pick a fresh address per request.
    "NUM_PROXIES": env_int("LSL_NUM_PROXIES", 0, minimum=0),
    "EXCEPTION_HANDLER": "lsl_site.errors.api_exception_handler",
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "LSL API",
    "DESCRIPTION": "Lightweight Subsystem for Linux: disposable, shareable dev environments on Docker.",
    "VERSION": LSL_VERSION,
    "SERVE_INCLUDE_SCHEMA": False,
    # Request and response components apart: what a client may send (read-only fields left out, blank
    # strings refused) is not what it gets back. tests/test_schemathesis.py holds the server to both.
    "COMPONENT_SPLIT_REQUEST": True,
    # Two fields named `role` with different choices: a name each, rather than a generated hash.
    "ENUM_NAME_OVERRIDES": {"TeamRoleEnum": "accounts.models.TeamRole", "GrantRoleEnum": ["viewer", "member", "admin"]},
    # Served by this server (drf-spectacular-sidecar through WhiteNoise), never a CDN: the docs work offline
    # and fit the Content-Security-Policy (the page's init script is a separate request: lsl_site/urls.py).
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # No validator badge: it would load an image from validator.swagger.io (and the policy blocks it).
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
}

# --- LSL -------------------------------------------------------------------
LSL_DOCKER_HOST = env_str("LSL_DOCKER_HOST")  # empty: DOCKER_HOST / the default socket
LSL_DOCKER_API_VERSION = env_str("LSL_DOCKER_API_VERSION", "1.41")
LSL_DOCKER_TIMEOUT = env_int("LSL_DOCKER_TIMEOUT", 60, minimum=1)
LSL_HOST_MOUNT_ROOTS = env_paths("LSL_HOST_MOUNT_ROOTS")
LSL_INSTANCE = env_str("LSL_INSTANCE", "default")  # label value on everything this server creates
LSL_CATALOG = env_str("LSL_CATALOG", str(BASE_DIR / "catalog" / "default.yaml"))
# The worker (manage.py lsl_worker): engine events keep rows current; a full reconcile every
# LSL_RECONCILE_INTERVAL seconds is the safety net for anything an event stream missed.
LSL_RECONCILE_INTERVAL = env_float("LSL_RECONCILE_INTERVAL", 30.0, minimum=1)
LSL_WORKER_THREADS = env_int("LSL_WORKER_THREADS", 4, minimum=1)
LSL_WORKER_POLL_INTERVAL = env_float("LSL_WORKER_POLL_INTERVAL", 0.5, minimum=0.01)  # fallback: queuing wakes it
LSL_PROVISION_LEASE = env_float("LSL_PROVISION_LEASE", 15.0, minimum=3)  # seconds; renewed every third of it
LSL_ENGINE_RETRY_FOR = env_float("LSL_ENGINE_RETRY_FOR", 30.0, minimum=0)  # provisioning waits this long for an engine that is down
# Nodes (environments/nodes.py): the worker asks every node's engine for `docker info` this often,
# waiting at most LSL_NODE_CHECK_TIMEOUT; LSL_NODE_FAILURES misses in a row mark it unavailable.
LSL_NODE_CHECK_INTERVAL = env_float("LSL_NODE_CHECK_INTERVAL", 2.0, minimum=0.2)
LSL_NODE_CHECK_TIMEOUT = env_float("LSL_NODE_CHECK_TIMEOUT", 3.0, minimum=0.2)
LSL_NODE_FAILURES = env_int("LSL_NODE_FAILURES", 2, minimum=1)
# Placement's capacity of a node added without --cpus/--memory-mb: the engine's figures times these.
LSL_NODE_CPU_OVERCOMMIT = env_float("LSL_NODE_CPU_OVERCOMMIT", 8.0, minimum=0.1)
LSL_NODE_MEMORY_OVERCOMMIT = env_float("LSL_NODE_MEMORY_OVERCOMMIT", 1.0, minimum=0.1)
LSL_STATS_INTERVAL = env_float("LSL_STATS_INTERVAL", 10.0, minimum=1)
# Events (lsl_site/events.py): wake-ups (lsl_site/wake.py: a local socket, Redis pub/sub across
# hosts) deliver them at once; polling this often is the fallback, slowed to LSL_EVENT_POLL_SLOW
# while Redis is healthy (it still catches up after an outage).
LSL_EVENT_POLL_INTERVAL = env_float("LSL_EVENT_POLL_INTERVAL", 0.25, minimum=0.01)
LSL_EVENT_POLL_SLOW = env_float("LSL_EVENT_POLL_SLOW", 1.0, minimum=0.05)
LSL_EVENT_RETENTION = env_float("LSL_EVENT_RETENTION", 3600.0, minimum=60)
LSL_SESSION_IDLE_TIMEOUT = env_float("LSL_SESSION_IDLE_TIMEOUT", 600.0, minimum=0)
LSL_SESSION_RECORD_INPUT = env_bool("LSL_SESSION_RECORD_INPUT", False)
# Unacked bytes per participant: ~0.5 s of a flood at the engine's TTY rate, so a healthy
# client's jitter is absorbed while a stalled one costs a bounded 4 MiB.
LSL_SESSION_WINDOW = env_int("LSL_SESSION_WINDOW", 4 * 1024 * 1024, minimum=4096)
LSL_SESSION_STALL_TIMEOUT = env_float("LSL_SESSION_STALL_TIMEOUT", 60.0, minimum=1)
# Server-side lag bound: output that waited longer than this in the server's own queues is skipped
# and the participant redrawn from a snapshot (a `lagging` frame says so); more than
# LSL_SESSION_MAX_LAG_RESYNCS of those in a minute and it is closed with `too_slow`.
LSL_SESSION_MAX_LAG = env_float("LSL_SESSION_MAX_LAG", 2.0, minimum=0.1)
LSL_SESSION_MAX_LAG_RESYNCS = env_int("LSL_SESSION_MAX_LAG_RESYNCS", 10, minimum=1)
# The session keeper (environments/keeper.py): shells live in it, inside each container, so they
# outlive the server. Its socket's directory is bind-mounted from LSL_KEEPER_DIR/<env>/ when set
# (the fast path, for an engine on this host); empty: reach it only through `docker exec`.
LSL_KEEPER_BINARY = Path(env_str("LSL_KEEPER_BINARY", str(BASE_DIR / "environments" / "keeper" / "lsl-keeper")))
LSL_KEEPER_DIR = env_str("LSL_KEEPER_DIR", str(VAR_DIR / "k"))
LSL_KEEPER_RING = env_int("LSL_KEEPER_RING", 2 * 1024 * 1024, minimum=4096)  # output bytes kept per session for a reattaching server
# The sessions' screen model (sessions/emulator.py): xterm.js run headless in one node child process per
# server process. A snapshot carries this many lines of scrollback; past LSL_EMULATOR_BACKLOG bytes
# waiting to be parsed for one terminal (a flood), node drops the head of it and snapshots are approximate.
LSL_NODE = env_str("LSL_NODE", "node")
LSL_EMULATOR_BUNDLE = Path(env_str("LSL_EMULATOR_BUNDLE", str(BASE_DIR / "sessions" / "emulator" / "dist" / "emulator.cjs")))
LSL_EMULATOR_BACKLOG = env_int("LSL_EMULATOR_BACKLOG", 4 * 1024 * 1024, minimum=64 * 1024)
LSL_SESSION_SNAPSHOT_SCROLLBACK = env_int("LSL_SESSION_SNAPSHOT_SCROLLBACK", 200, minimum=0)
# A session whose server died and to which nobody came back within this many seconds is ended
# (server_lost) and its shell killed; until then it survives, so a restart loses nothing.
LSL_SESSION_REATTACH_GRACE = env_float("LSL_SESSION_REATTACH_GRACE", 120.0, minimum=0)
LSL_WS_BASE_URL = env_str("LSL_WS_BASE_URL")  # empty: derived from the request
LSL_METRICS_TOKEN = env_str("LSL_METRICS_TOKEN")  # /metrics: this bearer token or a staff session; never the address

# Identity inside environments, idle stop and quotas (docs/host-integration.md).
LSL_UID_BASE = env_int("LSL_UID_BASE", 10000, minimum=1000)  # default uid/gid = LSL_UID_BASE + user id
LSL_HOST_NETWORK_ALL_USERS = env_bool("LSL_HOST_NETWORK_ALL_USERS", False)  # else staff or profile.allow_host_network
LSL_SETUP_LOG_MAX_BYTES = env_int("LSL_SETUP_LOG_MAX_BYTES", 1024 * 1024, minimum=4096)
LSL_SETUP_TIMEOUT = env_float("LSL_SETUP_TIMEOUT", 1800.0, minimum=1)  # seconds for all of a template's setup hooks
LSL_IDLE_STOP_AFTER = env_float("LSL_IDLE_STOP_AFTER", 0.0, minimum=0)  # seconds; 0 = never stop idle environments
LSL_IDLE_CHECK_INTERVAL = env_float("LSL_IDLE_CHECK_INTERVAL", 60.0, minimum=0.1)
LSL_QUOTA_USER_ENVIRONMENTS = env_int("LSL_QUOTA_USER_ENVIRONMENTS", 0, minimum=0)  # 0 = unlimited
LSL_QUOTA_USER_CPUS = env_float("LSL_QUOTA_USER_CPUS", 0.0, minimum=0)
LSL_QUOTA_USER_MEMORY_MB = env_int("LSL_QUOTA_USER_MEMORY_MB", 0, minimum=0)
# Disk: the total disk_mb of a user's environments (0 = unlimited), and objects a user may create
# (issue 12: one user made 104 teams in 15 minutes). Staff are exempt from the object counts.
LSL_QUOTA_USER_DISK_MB = env_int("LSL_QUOTA_USER_DISK_MB", 0, minimum=0)
LSL_QUOTA_USER_TEAMS = env_int("LSL_QUOTA_USER_TEAMS", 10, minimum=0)
LSL_QUOTA_USER_TEAM_VOLUMES = env_int("LSL_QUOTA_USER_TEAM_VOLUMES", 20, minimum=0)
# A disk limit per environment (workspace volume + container layer); a template may set its own.
# 0 = no limit. Hard on engines that support `storage_opt size` (the container layer only); measured
# by the worker every LSL_DISK_CHECK_INTERVAL seconds everywhere, and an environment over it is stopped.
LSL_DEFAULT_DISK_MB = env_int("LSL_DEFAULT_DISK_MB", 10240, minimum=0)
LSL_DISK_CHECK_INTERVAL = env_float("LSL_DISK_CHECK_INTERVAL", 60.0, minimum=0)  # 0 = never measure
LSL_DISK_GRACE = env_float("LSL_DISK_GRACE", 900.0, minimum=0)  # seconds to clean up after a disk stop

# Ports (issue 14): `lsl forward` and the browser preview reach an environment's ports through its
# keeper (127.0.0.1 inside the container), never the host or another container.
# LSL_PREVIEW_DOMAIN: a wildcard domain (`preview.example.com`, DNS `*.preview.example.com` pointing
# here) for subdomain previews; empty: previews are path-based (/preview/<env>/<port>/) only.
LSL_PREVIEW_DOMAIN = env_str("LSL_PREVIEW_DOMAIN", "").strip().strip(".").lower()
LSL_PREVIEW_LINK_TTL = env_float("LSL_PREVIEW_LINK_TTL", 24 * 3600.0, minimum=60)  # a public link's default lifetime (s)
LSL_PREVIEW_LINK_MAX_TTL = env_float("LSL_PREVIEW_LINK_MAX_TTL", 7 * 24 * 3600.0, minimum=60)  # the longest one allowed
LSL_PORT_SCAN_INTERVAL = env_float("LSL_PORT_SCAN_INTERVAL", 5.0, minimum=0)  # worker: listening ports; 0 = never

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LSL_LOG_LEVEL", "INFO")},
    "loggers": {"daphne": {"level": "WARNING"}, "docker": {"level": "WARNING"}, "urllib3": {"level": "WARNING"}},
}
