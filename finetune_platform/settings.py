"""Settings for Finetune Platform, all read from the environment (see ``.env.example``).

Zero configuration runs the embedded default: SQLite and the django-q2 database broker in
``FINETUNE_DATA_DIR``, an in-process channel layer, CPU slots. ``DATABASE_URL`` and ``REDIS_URL``
switch to PostgreSQL and Redis.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sys
from datetime import timedelta
from pathlib import Path

import dj_database_url

from core.env import env_bool, env_float, env_int, env_list, env_paths, env_str
from core.queues import host_queue

BASE_DIR = Path(__file__).resolve().parent.parent


def _load_dotenv(path: Path) -> None:
    """Read ``KEY=value`` lines from ``.env`` without overriding the real environment."""
    if not path.is_file():
        return
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        os.environ.setdefault(key.strip(), value.strip().strip("'\""))


_load_dotenv(BASE_DIR / ".env")

# --- Where the platform keeps its state ------------------------------------------------------
def _dir(name: str, default: Path) -> Path:
    """A directory from the environment; relative paths are taken from the repository root."""
    path = Path(env_str(name, str(default))).expanduser()
    return (path if path.is_absolute() else BASE_DIR / path).resolve()


DATA_DIR = _dir("FINETUNE_DATA_DIR", BASE_DIR / "data")
DATA_DIR.mkdir(parents=True, exist_ok=True)
# Users' datasets, logs and outputs; a separate disk (or, in the tests, a folder per test) if wanted.
WORKSPACES_DIR = _dir("FINETUNE_WORKSPACES_DIR", DATA_DIR / "workspaces")
HUB_CACHE_DIR = _dir("FINETUNE_HUB_CACHE_DIR", DATA_DIR / "hub-cache")


def _secret_key() -> str:
    key = env_str("SECRET_KEY")
    if key:
        return key
    key_file = DATA_DIR / "secret_key"
    if not key_file.exists():
        # Written once with owner-only permissions; never committed (data/ is git-ignored).
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# --- Transport security (docs/security.md, "Logins and accounts") --------------------------------
# Off by default: zero configuration serves plain HTTP on 127.0.0.1. Behind HTTPS, turn them on.
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("FINETUNE_SECURE_COOKIES", False)
SECURE_HSTS_SECONDS = env_int("FINETUNE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("FINETUNE_HSTS_INCLUDE_SUBDOMAINS", False)
# Only behind a proxy that sets X-Forwarded-Proto itself (and overwrites what a client sent).
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("FINETUNE_PROXY_SSL_HEADER", False) else None
SECURE_SSL_REDIRECT = env_bool("FINETUNE_SSL_REDIRECT", False)
SESSION_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# How many reverse proxies in front of the platform append to X-Forwarded-For: 0 = the client's
# address is REMOTE_ADDR and the header is ignored. Used by the log-in lockout and DRF's NUM_PROXIES.
FINETUNE_TRUSTED_PROXIES = env_int("FINETUNE_TRUSTED_PROXIES", 0, minimum=0, maximum=10)

# --- Applications ------------------------------------------------------------------------------
INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_q",
    "channels",
    "axes",
    "accounts",
    "tasks",
    "gpus",
    "deployments",
    "usage",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last (django-axes' rule): turns a refused log-in into accounts.security.lockout_response.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "finetune_platform.urls"
WSGI_APPLICATION = "finetune_platform.wsgi.application"
ASGI_APPLICATION = "finetune_platform.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "accounts.security.signup_context",
            ],
        },
    },
]

# --- Database ----------------------------------------------------------------------------------
_default_db = f"sqlite:///{DATA_DIR / 'db.sqlite3'}"
DATABASES = {"default": dj_database_url.parse(env_str("DATABASE_URL", _default_db), conn_max_age=0)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE transactions serialise writers (the dispatcher's slot count relies on it), WAL lets
    # the web process read while a worker writes, and the timeout waits out short write locks.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # A file, not :memory:, so worker subprocesses started by the tests see the same test database.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test-db.sqlite3")}
else:
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # A database host that does not answer at all (not a refused connection) must not hold a
    # supervisor's retry for the TCP timeout (minutes): the retry loop waits with backoff instead.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("connect_timeout", 10)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Auth --------------------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
    # Not a check: its password_changed hook revokes the user's API tokens.
    {"NAME": "accounts.security.RevokeTokensOnPasswordChange"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"
# open: anyone may create an account; closed: operators create accounts in the admin.
FINETUNE_SIGNUP = env_str("FINETUNE_SIGNUP", "open").strip().lower()
if FINETUNE_SIGNUP not in ("open", "closed"):
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(f"FINETUNE_SIGNUP={FINETUNE_SIGNUP!r}: use open or closed")

# Password guessing (django-axes, see accounts/security.py): every log-in form and the token
# endpoint count failures per user name and per client address; FINETUNE_LOGIN_FAILURES of them
# within the cool-off lock that user name (or address) for FINETUNE_LOGIN_COOLOFF_MINUTES.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("FINETUNE_LOGIN_FAILURES", 10, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("FINETUNE_LOGIN_COOLOFF_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = "accounts.security.lockout_parameters"
AXES_CLIENT_IP_CALLABLE = "accounts.security.client_ip"
AXES_LOCKOUT_CALLABLE = "accounts.security.lockout_response"
# accounts.signals clears a user name's failures from one address on success (axes' own reset would
# clear the whole address's failures: a bypass for anyone with an account).
AXES_RESET_ON_SUCCESS = False
# Attempts while locked out are refused without being counted: the lock ends on time.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False

# --- I18n / static -----------------------------------------------------------------------------
LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("zh-hans", "简体中文")]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

# --- Uploads -----------------------------------------------------------------------------------
FINETUNE_MAX_DATASET_MB = env_int("FINETUNE_MAX_DATASET_MB", 512, minimum=1)
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024

# --- DRF / OpenAPI -----------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "core.query.Pagination",
    "PAGE_SIZE": 20,
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "core.api.AutoSchema",
    "EXCEPTION_HANDLER": "core.api.exception_handler",
    # The client address of any DRF throttle: the same proxies as the log-in lockout trusts.
    "NUM_PROXIES": FINETUNE_TRUSTED_PROXIES,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Finetune Platform API",
    "DESCRIPTION": "Fine-tune LLMs with ms-swift on shared GPU servers.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # The schema needs a log-in like every page (the docs pages redirect to it: finetune_platform/urls.py).
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
}

# --- Channels ----------------------------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py's default socket timeout (5 s) equals channels-redis's blocking pop: an idle
            # receive would time out and raise; a longer one keeps idle listeners quiet.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 30}],
                       "prefix": env_str("CHANNELS_PREFIX", "ftp")},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- The training runtime ----------------------------------------------------------------------
def _default_swift() -> str:
    local = BASE_DIR / ".venv-swift" / "bin" / "swift"
    if local.exists():
        return str(local)
    return shutil.which("swift") or "swift"


FINETUNE_SWIFT_BIN = env_str("FINETUNE_SWIFT_BIN") or _default_swift()
FINETUNE_MODEL_ROOTS = env_paths("FINETUNE_MODEL_ROOTS")
FINETUNE_OFFLINE = env_bool("FINETUNE_OFFLINE", False)
FINETUNE_HOST = env_str("FINETUNE_HOST") or socket.gethostname()
# --- Compute inventory and scheduling (gpus app, tasks.scheduler) ---
FINETUNE_GPU_BACKEND = env_str("FINETUNE_GPU_BACKEND", "nvml")
if FINETUNE_GPU_BACKEND not in ("nvml", "fake", "none"):
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(f"FINETUNE_GPU_BACKEND={FINETUNE_GPU_BACKEND!r}: use nvml, fake or none")
# The fake backend's cards: "2x80" (two 80 GB GPUs), "80,24", or JSON [{"name", "memory_gb"}].
FINETUNE_FAKE_GPUS = env_str("FINETUNE_FAKE_GPUS", "")
# CPU slots this host offers; default 1 on a host without GPUs, 0 on a GPU host.
FINETUNE_CPU_SLOTS: int | None = (
    env_int("FINETUNE_CPU_SLOTS", 0, minimum=0, maximum=64) if env_str("FINETUNE_CPU_SLOTS") else None
)
FINETUNE_GPU_REFRESH_SECONDS = env_float("FINETUNE_GPU_REFRESH_SECONDS", 3.0, minimum=0.2)
# A host whose agent has not reported for this long takes no new work.
FINETUNE_HOST_STALE_SECONDS = env_float("FINETUNE_HOST_STALE_SECONDS", 30.0, minimum=1.0)
# Backfill: a later task may pass a blocked task only until the blocked one has waited this long;
# from then on the GPUs it will need are kept for it (see tasks/scheduler.py).
FINETUNE_BACKFILL_MAX_WAIT_SECONDS = env_float("FINETUNE_BACKFILL_MAX_WAIT_SECONDS", 600.0, minimum=0.0)
FINETUNE_STOP_GRACE_SECONDS = env_float("FINETUNE_STOP_GRACE_SECONDS", 30.0, minimum=0.0)
# How long a stop request waits for the process to end before answering (it keeps going after).
FINETUNE_STOP_WAIT_SECONDS = env_float("FINETUNE_STOP_WAIT_SECONDS", 3.0, minimum=0.0)
FINETUNE_MAX_RUNTIME_HOURS = env_int("FINETUNE_MAX_RUNTIME_HOURS", 7 * 24, minimum=1)
FINETUNE_HEARTBEAT_SECONDS = env_float("FINETUNE_HEARTBEAT_SECONDS", 5.0, minimum=0.5)
# A running task whose runner has not reported for this long is considered lost.
FINETUNE_LOST_AFTER_SECONDS = env_float("FINETUNE_LOST_AFTER_SECONDS", 120.0, minimum=5.0)
FINETUNE_POLL_SECONDS = env_float("FINETUNE_POLL_SECONDS", 0.1, minimum=0.01)
# Extra variables a swift process inherits (names or shell-style patterns, comma-separated).
FINETUNE_ENV_PASSTHROUGH = env_list("FINETUNE_ENV_PASSTHROUGH", [])
FINETUNE_MASTER_PORT_BASE = env_int("FINETUNE_MASTER_PORT_BASE", 29500, minimum=1024, maximum=64000)
# The smoke preset trains the built-in tiny random model unless an operator names a real small model.
FINETUNE_SMOKE_MODEL = env_str("FINETUNE_SMOKE_MODEL")
FINETUNE_SMOKE_MODEL_TYPE = env_str("FINETUNE_SMOKE_MODEL_TYPE", "qwen2")
FINETUNE_SMOKE_TEMPLATE = env_str("FINETUNE_SMOKE_TEMPLATE", "qwen2_5")


def _default_swift_python() -> str:
    """The Python of swift's environment: the ``python`` next to the swift executable (a venv's
    ``bin/``), else ``python3`` on PATH. The venv's ``python`` is used as a link, not resolved: only
    the link sees the venv's packages."""
    swift = shutil.which(FINETUNE_SWIFT_BIN)
    if swift:
        for name in ("python", "python3"):
            sibling = Path(swift).parent / name
            if sibling.exists():
                return str(sibling)
    return shutil.which("python3") or "python3"


# Builds the built-in models (tasks/builtin_models) on first use; needs torch and transformers.
FINETUNE_SWIFT_PYTHON = env_str("FINETUNE_SWIFT_PYTHON") or _default_swift_python()
# Where built-in models are built, once per host (a few MB).
BUILTIN_MODELS_DIR = _dir("FINETUNE_BUILTIN_MODELS_DIR", DATA_DIR / "builtin-models")

# --- Trust (docs/security.md) ---
# swift loads every hub model and dataset with trust_remote_code=True: a repository's Python runs on
# the worker. Hub ids are accepted only when they match these globs (``*`` trusts every user); a user
# marked trusted by staff may use any. Local models under FINETUNE_MODEL_ROOTS are the operator's own.
FINETUNE_HUB_MODELS = env_list("FINETUNE_HUB_MODELS", [
    "Qwen/*", "deepseek-ai/*", "meta-llama/*", "LLM-Research/*", "mistralai/*", "google/*",
    "microsoft/*", "OpenGVLab/*", "01-ai/*", "BAAI/*", "HuggingFaceTB/*",
])
FINETUNE_HUB_DATASETS = env_list("FINETUNE_HUB_DATASETS", [
    "AI-ModelScope/*", "swift/*", "modelscope/*", "Qwen/*", "HuggingFaceH4/*", "tatsu-lab/*",
    "openai/*", "BAAI/*",
])
# Pass HF_TOKEN / MODELSCOPE_API_TOKEN to jobs (gated models); off: jobs never see the operator's tokens.
FINETUNE_HUB_TOKENS = env_bool("FINETUNE_HUB_TOKENS", False)
# Defence in depth: run every swift process as this OS user (the worker must be root or have
# CAP_SETUID); it must not be able to read FINETUNE_DATA_DIR's secret key or database.
FINETUNE_RUN_AS = env_str("FINETUNE_RUN_AS")

# --- Bounded input (docs/security.md) ---
FINETUNE_MAX_DATASET_COLUMNS = env_int("FINETUNE_MAX_DATASET_COLUMNS", 256, minimum=1)
# Open live sockets (pages) one user may hold in one web process.
FINETUNE_MAX_SOCKETS_PER_USER = env_int("FINETUNE_MAX_SOCKETS_PER_USER", 32, minimum=1)
# How often a socket re-checks its user (deactivated, logged out, token revoked: closed).
FINETUNE_SOCKET_RECHECK_SECONDS = env_float("FINETUNE_SOCKET_RECHECK_SECONDS", 5.0, minimum=0.1)

# --- Deployments (swift deploy behind the gateway; see docs/deployments.md) ---
def _port_range(name: str, default: str) -> tuple[int, int]:
    raw = env_str(name, default)
    low, sep, high = raw.partition("-")
    try:
        first, last = int(low), int(high if sep else low)
    except ValueError:
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(f"{name}={raw!r}: use a range such as 8100-8299") from None
    if not 1024 <= first <= last <= 65535:
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(f"{name}={raw!r}: ports must be 1024-65535, low-high")
    return first, last


# Ports swift deploy may bind on 127.0.0.1 (one per active deployment and host).
FINETUNE_DEPLOY_PORTS = _port_range("FINETUNE_DEPLOY_PORTS", "8100-8299")
# Stop a deployment nobody has called for this many minutes (0 = never).
FINETUNE_DEPLOY_IDLE_MINUTES = env_float("FINETUNE_DEPLOY_IDLE_MINUTES", 0.0, minimum=0.0)
# A deployment that is not answering /v1/models this long after its start has failed.
FINETUNE_DEPLOY_READY_TIMEOUT_SECONDS = env_float("FINETUNE_DEPLOY_READY_TIMEOUT_SECONDS", 900.0, minimum=5.0)
# How long the gateway waits for the model server to answer (long generations stream).
FINETUNE_DEPLOY_GATEWAY_TIMEOUT_SECONDS = env_float("FINETUNE_DEPLOY_GATEWAY_TIMEOUT_SECONDS", 600.0, minimum=1.0)
# The address other hosts (the gateway) reach this host's deployments on; swift deploy binds to it.
FINETUNE_HOST_ADDRESS = env_str("FINETUNE_HOST_ADDRESS", "127.0.0.1")
# The gateway forwards only what it understands, within these bounds (docs/security.md).
FINETUNE_GATEWAY_MAX_BODY_KB = env_int("FINETUNE_GATEWAY_MAX_BODY_KB", 8192, minimum=1)
FINETUNE_GATEWAY_MAX_IMAGE_KB = env_int("FINETUNE_GATEWAY_MAX_IMAGE_KB", 4096, minimum=0)
FINETUNE_GATEWAY_MAX_ANSWER_MB = env_int("FINETUNE_GATEWAY_MAX_ANSWER_MB", 16, minimum=1)
FINETUNE_GATEWAY_USER_CONCURRENCY = env_int("FINETUNE_GATEWAY_USER_CONCURRENCY", 4, minimum=1)
FINETUNE_GATEWAY_POOL_TIMEOUT_SECONDS = env_float("FINETUNE_GATEWAY_POOL_TIMEOUT_SECONDS", 5.0, minimum=0.1)
# Inference backends offered besides transformers; empty = those installed next to swift.
FINETUNE_DEPLOY_BACKENDS = env_list("FINETUNE_DEPLOY_BACKENDS", [])

# --- django-q2 ---------------------------------------------------------------------------------
# Training jobs run for hours or days. The broker re-presents a job whose receipt is older than
# ``retry``; that must never happen to a running job, so retry is far longer than any job may
# run, failures are acknowledged (never silently re-run) and each job starts with an idempotent
# claim on the task row (see tasks.runner.claim).
_max_runtime = FINETUNE_MAX_RUNTIME_HOURS * 3600
_q_name = env_str("Q_CLUSTER_NAME_BASE", "finetune")
Q_CLUSTER = {
    "name": _q_name,
    # Each host's worker listens on its own queue: the dispatcher enqueues a task on the queue of
    # the host that holds its GPUs (tasks.scheduler), so a task runs only where its GPUs are.
    "cluster_name": host_queue(_q_name, FINETUNE_HOST),
    "orm": "default",
    # Each running task occupies a worker process for its whole run: `manage.py worker` raises this
    # to (GPUs + CPU slots + 2) once it has discovered the host, unless FINETUNE_WORKERS is set.
    "workers": env_int("FINETUNE_WORKERS", 4, minimum=2),
    "timeout": _max_runtime + 3600,
    "retry": _max_runtime + 86400,
    "max_attempts": 1,
    "ack_failures": True,
    "catch_up": False,
    "poll": env_float("FINETUNE_QUEUE_POLL_SECONDS", 0.2, minimum=0.01),
    "queue_limit": 2,
    "save_limit": 500,
    "recycle": 50,
    "label": "Task queue",
    "ALT_CLUSTERS": {},
}

# --- Logging -----------------------------------------------------------------------------------
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain", "stream": sys.stderr}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    # httpx logs every request the deployment gateway proxies at INFO.
    "loggers": {"django_q": {"level": env_str("Q_LOG_LEVEL", "WARNING")}, "httpx": {"level": "WARNING"},
                # axes announces itself at INFO in every process; lockouts are WARNING.
                "axes": {"level": env_str("AXES_LOG_LEVEL", "WARNING")}},
}

# --- fair share (issue 12; docs/operations.md "Quotas and fair share") --------------------------------
# Tasks a user may have waiting when no quota row says otherwise (0: no limit). Staff are not bound.
FINETUNE_DEFAULT_MAX_WAITING_TASKS = env_int("FINETUNE_DEFAULT_MAX_WAITING_TASKS", 200, minimum=0)
# Priorities above this are for staff only (0-10; larger runs first).
FINETUNE_USER_MAX_PRIORITY = env_int("FINETUNE_USER_MAX_PRIORITY", 5, minimum=0, maximum=10)
# The usage window fairness looks at: within a priority, the user with the least GPU use over it goes first.
FINETUNE_FAIRSHARE_WINDOW_HOURS = env_float("FINETUNE_FAIRSHARE_WINDOW_HOURS", 7 * 24.0, minimum=1.0)
# The save_total_limit a task gets when it sets none (checkpoints kept on disk; 0: swift's default, all).
FINETUNE_DEFAULT_SAVE_TOTAL_LIMIT = env_int("FINETUNE_DEFAULT_SAVE_TOTAL_LIMIT", 3, minimum=0)
