"""agentops settings: everything that varies between deployments comes from the
environment, through the helpers in agentops.config, which name the variable on a bad
value. docs/configuration.md lists every one (a test holds it to the code)."""

from __future__ import annotations

import os
from pathlib import Path

from agentops.config import (
    database_from_url,
    env_bool,
    env_choice,
    env_commands,
    env_file_load,
    env_float,
    env_int,
    env_list,
    env_provider_limits,
    env_secret_names,
    env_str,
    secret_key,
)

BASE_DIR = Path(__file__).resolve().parent.parent
# A .env file of KEY=VALUE lines, for a checkout (`make demo` writes one); the real
# environment wins. AGENTOPS_ENV_FILE names another file, or none when empty.
ENV_FILE = os.environ.get("AGENTOPS_ENV_FILE", str(BASE_DIR / ".env"))
if ENV_FILE:
    env_file_load(BASE_DIR / ENV_FILE)
VAR_DIR = BASE_DIR / (env_str("AGENTOPS_VAR_DIR") or "var")  # relative: to the project
VAR_DIR.mkdir(parents=True, exist_ok=True)  # the SQLite file, the dev secret key, demo mail

DEBUG = env_bool("DEBUG", default=False)
SECRET_KEY = secret_key(debug=DEBUG, key_file=VAR_DIR / "secret_key")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "template_partials",
    "django_q",
    # The API's interactive docs, served from ninja's own static files (nothing fetched).
    "ninja",
    "agentops",
    "lineage",
    "tasks",
    "approvals",
    "triggers",
    "demo",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files with DEBUG off (WhiteNoise): from STATIC_ROOT once collected.
    "agentops.static_files.StaticFilesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # The admin's own views answer some bad input with a 500: refused first, with a 400.
    "agentops.bad_input.AdminInputMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "agentops.urls"
WSGI_APPLICATION = "agentops.wsgi.application"
ASGI_APPLICATION = "agentops.asgi.application"

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
                "approvals.context_processors.inbox_count",
            ],
        },
    },
]

DATABASE_URL = env_str("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'agentops.sqlite3'}"
DATABASES = {"default": database_from_url("DATABASE_URL", DATABASE_URL, base_dir=BASE_DIR)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "static"

# Email: SMTP when EMAIL_HOST is set; otherwise files under var/mail (EMAIL_BACKEND
# names another backend, such as the console), so the demo's mail can be read.
EMAIL_HOST = env_str("EMAIL_HOST")
if EMAIL_HOST:
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_PORT = env_int("EMAIL_PORT", 25, minimum=1)
    EMAIL_HOST_USER = env_str("EMAIL_HOST_USER")
    EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD")
    EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", default=False)
else:
    EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.filebased.EmailBackend")
    EMAIL_FILE_PATH = VAR_DIR / "mail"
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "agentops@localhost")

# Optional: every approval that opens is also POSTed as JSON to this URL, signed with
# HMAC-SHA256 of the body under the secret (header X-Agentops-Signature: sha256=<hex>).
AGENTOPS_APPROVAL_WEBHOOK_URL = env_str("AGENTOPS_APPROVAL_WEBHOOK_URL")
AGENTOPS_APPROVAL_WEBHOOK_SECRET = env_str("AGENTOPS_APPROVAL_WEBHOOK_SECRET")
if AGENTOPS_APPROVAL_WEBHOOK_URL and not AGENTOPS_APPROVAL_WEBHOOK_URL.startswith(
    ("http://", "https://")
):
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(
        f"AGENTOPS_APPROVAL_WEBHOOK_URL={AGENTOPS_APPROVAL_WEBHOOK_URL!r} is not an http(s) URL"
    )
if AGENTOPS_APPROVAL_WEBHOOK_URL and not AGENTOPS_APPROVAL_WEBHOOK_SECRET:
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(
        "AGENTOPS_APPROVAL_WEBHOOK_URL needs AGENTOPS_APPROVAL_WEBHOOK_SECRET to sign its posts"
    )

# The demo's sample ledger: a SQLite file apart from agentops' own database.
# SQL tools may not reach agentops' own database (its runs, approvals, the dial) unless
# this says so: the test suite does, using its own database as a peer.
AGENTOPS_SQL_OWN_DATABASE = env_bool("AGENTOPS_SQL_OWN_DATABASE", default=False)
# What a tool may reach on a worker. Secrets: the environment variables a tool's config may
# name as secret:NAME besides those starting with TOOL_SECRET_ (never agentops' own).
# Commands: what an MCP stdio server may be, each an argv prefix ("python -m mcp_server_time").
AGENTOPS_TOOL_SECRETS = env_secret_names("AGENTOPS_TOOL_SECRETS")
AGENTOPS_MCP_COMMANDS = env_commands("AGENTOPS_MCP_COMMANDS")
AGENTOPS_DEMO_LEDGER = VAR_DIR / (env_str("AGENTOPS_DEMO_LEDGER") or "demo_ledger.sqlite3")

# Queues. django-q2 on the ORM broker is the embedded default: no service beyond the
# database. Celery on Redis is the scale-out choice.
AGENTOPS_QUEUE = env_choice("AGENTOPS_QUEUE", ("q2", "celery"), "q2")
REDIS_URL = env_str("REDIS_URL")
if AGENTOPS_QUEUE == "celery" and not REDIS_URL:
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured("AGENTOPS_QUEUE=celery needs REDIS_URL (redis://host:6379/0)")

# A slice is the work one queue job does before it hands the run back to the queue,
# so a long run never holds a worker past the queue's timeout.
AGENTOPS_SLICE_SECONDS = env_float("AGENTOPS_SLICE_SECONDS", 60.0, minimum=1.0)
AGENTOPS_LEASE_SECONDS = env_float("AGENTOPS_LEASE_SECONDS", 120.0, minimum=5.0)

# The async worker (agentops.runtime.engine.runner): each queue worker process keeps up to
# this many runs in flight at once, a run waiting on a model or a tool's I/O holding no
# process, thread or connection of its own. 0: the inline mode, where a run holds its
# queue worker process for its whole slice, waits included.
AGENTOPS_WORKER_CONCURRENCY = env_int("AGENTOPS_WORKER_CONCURRENCY", 100, minimum=0)
# Limits on calls to a model provider, per model or base URL (agentops.runtime.providers):
# {"gpt-4o": {"concurrency": 50, "rpm": 500, "tpm": 300000}}. Each worker process keeps
# them for itself.
AGENTOPS_PROVIDER_LIMITS = env_provider_limits("AGENTOPS_PROVIDER_LIMITS")
# The bounded pool, per worker process, where calls with no async form run (a python
# tool, which may block; SQL and SMTP drivers): a call beyond it waits its turn.
AGENTOPS_TOOL_THREADS = env_int("AGENTOPS_TOOL_THREADS", 16, minimum=1)
# When a worker process stops, how long its runs in flight get to reach their next step
# and go back to the queue; any still out after it are left to the reaper (their leases).
AGENTOPS_WORKER_DRAIN_SECONDS = env_float("AGENTOPS_WORKER_DRAIN_SECONDS", 30.0, minimum=0.0)
# How long a queue worker process keeps its database connections open between jobs
# (Django's CONN_MAX_AGE, with its health check), set by the worker processes only
# (dispatch.worker_connections_keep): a worker opens a connection per job otherwise, and
# django-q2's ORM broker one per operation. 0 closes them after each, as web requests do.
AGENTOPS_WORKER_CONN_MAX_AGE = env_int("AGENTOPS_WORKER_CONN_MAX_AGE", 300, minimum=0)

# A job still going at three slices is stuck (a Python tool has no timeout of its own):
# either queue then ends the worker process running it, which the engine treats as any
# crash: the run's lease lapses and the reaper hands the run to the next worker.
AGENTOPS_JOB_TIME_LIMIT = int(AGENTOPS_SLICE_SECONDS * 3)
# A run whose worker stops this many times in a row (a crash, a job ended at its time
# limit) with no step recorded in between is halted, not recovered again: a call or a
# model answer that kills every worker that tries it would otherwise loop, unbilled
# and unbounded, since the work a crash loses is never counted against the budgets.
AGENTOPS_RECOVERY_LIMIT = env_int("AGENTOPS_RECOVERY_LIMIT", 3, minimum=1)

Q_CLUSTER = {
    "name": "agentops",
    "orm": "default",
    "workers": env_int("AGENTOPS_Q2_WORKERS", 2, minimum=1),
    "poll": 0.2,
    # The pusher takes up to this many messages a query (one by default): with the async
    # worker a job is a hand-over, and a burst of runs reaches the workers ten at a time.
    # Inline, a job is a whole slice: messages the pusher holds while every worker is busy
    # would wait behind them, and outlive their lock (``retry``), so one at a time.
    "bulk": 10 if AGENTOPS_WORKER_CONCURRENCY > 0 else 1,
    # Retry above the timeout (django-q2 requires it); the lease stops a retried job from
    # advancing a run twice.
    "timeout": AGENTOPS_JOB_TIME_LIMIT,
    "retry": AGENTOPS_JOB_TIME_LIMIT + 60,
    "max_attempts": 1,
    "catch_up": False,
    "save_limit": 1000,
    "ack_failures": True,
    # A worker process is replaced after this many jobs. With the async worker a job is a
    # hand-over that takes a moment, and a process replaced drains its runs in flight
    # back to the queue first: django-q2's default (500) would do that every few minutes.
    "recycle": 10_000,
}
# django-q2's clusters report themselves (their heartbeat, their workers) to this cache:
# a file cache on this machine, so the overview in the web process reads what the worker
# processes wrote (Django's default cache lives inside each process).
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "q2": {
        "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
        "LOCATION": str(VAR_DIR / "cache-q2"),
    },
}
Q_CLUSTER["cache"] = "q2"

CELERY_BROKER_URL = REDIS_URL or "redis://127.0.0.1:6379/0"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_TIME_LIMIT = AGENTOPS_JOB_TIME_LIMIT  # ends the pool's child process (prefork)
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True

# Models. Any OpenAI-compatible server: OpenAI, Azure OpenAI, vLLM, Ollama, LM Studio.
OPENAI_API_KEY = env_str("OPENAI_API_KEY")
OPENAI_BASE_URL = env_str("OPENAI_BASE_URL")
AGENTOPS_MODEL = env_str("AGENTOPS_MODEL")
# The longest one model call may take, request to last byte (less near a run's time
# budget): a server that trickles its answer is cut off there, however steady its bytes.
AGENTOPS_MODEL_TIMEOUT = env_float("AGENTOPS_MODEL_TIMEOUT", 60.0, minimum=1.0)
# The most one model answer may carry, in bytes as read (after decompression): a server
# that sends more is cut off as it sends, not read whole into the worker's memory.
AGENTOPS_MODEL_MAX_ANSWER_BYTES = env_int(
    "AGENTOPS_MODEL_MAX_ANSWER_BYTES", 8 * 1024 * 1024, minimum=64 * 1024
)
# The cap on one answer's tokens (sent as max_tokens): it bounds a call's projected cost.
AGENTOPS_MAX_OUTPUT_TOKENS = env_int("AGENTOPS_MAX_OUTPUT_TOKENS", 4096, minimum=64)
# The most a model's tool call may carry as arguments (UTF-8 bytes of its JSON). A call
# over it is refused, and only a stand-in is kept (its first bytes and its sha256), so it
# is neither stored whole nor sent back to the model in every later turn.
AGENTOPS_MAX_ARGUMENT_BYTES = env_int("AGENTOPS_MAX_ARGUMENT_BYTES", 64 * 1024, minimum=4096)
# The first retry's delay after a transient model error; each next one doubles.
AGENTOPS_MODEL_BACKOFF_SECONDS = env_float("AGENTOPS_MODEL_BACKOFF_SECONDS", 1.0, minimum=0.0)

# The trail's signed checkpoints (lineage.anchoring), kept outside the database. The key
# (base64 of an Ed25519 seed) from the variable, else from the file; in development the
# file is made on first use. Relative paths are under VAR_DIR.
AGENTOPS_LINEAGE_SIGNING_KEY = env_str("AGENTOPS_LINEAGE_SIGNING_KEY")
AGENTOPS_LINEAGE_SIGNING_KEY_FILE = VAR_DIR / (
    env_str("AGENTOPS_LINEAGE_SIGNING_KEY_FILE") or "lineage_signing_key"
)
AGENTOPS_LINEAGE_PUBLIC_KEY = env_str("AGENTOPS_LINEAGE_PUBLIC_KEY")  # verify-only hosts
AGENTOPS_LINEAGE_CHECKPOINT_FILE = VAR_DIR / (
    env_str("AGENTOPS_LINEAGE_CHECKPOINT_FILE") or "lineage_checkpoints.jsonl"
)
AGENTOPS_LINEAGE_SINK = env_str("AGENTOPS_LINEAGE_SINK") or "lineage.anchoring.FileSink"
AGENTOPS_LINEAGE_WEBHOOK_URL = env_str("AGENTOPS_LINEAGE_WEBHOOK_URL")
# How long before a full checkpoint a chain must have begun to be expected in it.
AGENTOPS_LINEAGE_CHECKPOINT_GRACE = env_float(
    "AGENTOPS_LINEAGE_CHECKPOINT_GRACE", 300.0, minimum=0.0
)
# A log whose last complete checkpoint is older than this (seconds) has stopped being
# written, and verify_lineage says so; 0 turns the check off.
AGENTOPS_LINEAGE_CHECKPOINT_MAX_AGE = env_float(
    "AGENTOPS_LINEAGE_CHECKPOINT_MAX_AGE", 900.0, minimum=0.0
)
AGENTOPS_LINEAGE_VERIFY_WORKERS = env_int(
    "AGENTOPS_LINEAGE_VERIFY_WORKERS", os.cpu_count() or 1, minimum=1
)

# Triggers (triggers/). The listeners' process (`manage.py triggers`, which `serve`
# starts) consumes queue messages and inbound email, and ticks the schedules; the queue
# cluster or Celery beat ticks them too, every minute, so a slot fires once whichever
# comes first.
AGENTOPS_TRIGGER_TICK_SECONDS = env_float("AGENTOPS_TRIGGER_TICK_SECONDS", 5.0, minimum=0.5)
# How often the listeners read the triggers again, to start and stop their consumers.
AGENTOPS_TRIGGER_RELOAD_SECONDS = env_float("AGENTOPS_TRIGGER_RELOAD_SECONDS", 10.0, minimum=1.0)
# The SMTP listener for inbound-email triggers; empty host: none.
AGENTOPS_SMTP_LISTEN_HOST = env_str("AGENTOPS_SMTP_LISTEN_HOST", "127.0.0.1")
AGENTOPS_SMTP_LISTEN_PORT = env_int("AGENTOPS_SMTP_LISTEN_PORT", 8025, minimum=1)
# Where inbound emails' attachments are kept (by their sha256), relative to VAR_DIR.
AGENTOPS_ATTACHMENT_DIR = VAR_DIR / (env_str("AGENTOPS_ATTACHMENT_DIR") or "attachments")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "agentops": {
            "handlers": ["console"],
            "level": env_choice(
                "AGENTOPS_LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", upper=True
            ),
        },
    },
}

# Live pages (tasks.views_live): a server-sent event stream ends after this many seconds
# and the browser reconnects from its last event, so no stream is held forever.
AGENTOPS_LIVE_STREAM_SECONDS = env_float("AGENTOPS_LIVE_STREAM_SECONDS", 300.0, minimum=1.0)
# The live streams one person may hold open in one server process (tabs of run pages
# and lists); past it a stream is refused with a 503 and the page polls instead.
AGENTOPS_LIVE_STREAMS_PER_USER = env_int("AGENTOPS_LIVE_STREAMS_PER_USER", 20, minimum=1)

# The integration surface. The JSON API (agentops.api): requests one person may make in
# a minute, all their tokens together, past which it is answered 429 with Retry-After.
AGENTOPS_API_RATE_PER_MINUTE = env_int("AGENTOPS_API_RATE_PER_MINUTE", 120, minimum=1)
# Traces of every run over OTLP/HTTP (agentops.telemetry), sent only when an endpoint is
# set (the collector's base URL, as OpenTelemetry's own variable names it).
OTEL_EXPORTER_OTLP_ENDPOINT = env_str("OTEL_EXPORTER_OTLP_ENDPOINT")
OTEL_SERVICE_NAME = env_str("OTEL_SERVICE_NAME", "agentops")
# Prometheus scrapes /metrics (agentops.metrics) with this bearer token; staff may read it
# while signed in. Empty: only staff.
AGENTOPS_METRICS_TOKEN = env_str("AGENTOPS_METRICS_TOKEN")
