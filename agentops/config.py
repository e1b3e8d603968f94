"""Settings helpers: read one environment variable each, and fail loudly.

Every helper raises ``ImproperlyConfigured`` naming the variable and the value it could
not use, so a bad deployment stops at start-up with a message an operator can act on.
"""

from __future__ import annotations

import os
import secrets
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


def env_file_load(path: Path) -> None:
    """Read ``KEY=VALUE`` lines from a ``.env`` file into the environment. Variables
    already set win, so a deployment's real environment always overrides the file."""
    if not path.exists():
        return
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ImproperlyConfigured(f"{path}, line {number}: expected KEY=VALUE, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        os.environ.setdefault(key, value)


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ImproperlyConfigured(
        f"{name}={raw!r} is not a boolean: use one of {sorted(TRUE_WORDS | FALSE_WORDS - {''})}"
    )


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a whole number") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={raw!r} must be at least {minimum}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={raw!r} must be at least {minimum}")
    return value


def env_choice(name: str, choices: tuple[str, ...], default: str, *, upper: bool = False) -> str:
    value = env_str(name, default) or default
    value = value.upper() if upper else value.lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


# The environment variables agentops itself reads for its own credentials and wiring: no
# tool may name one as a secret, even one listed in AGENTOPS_TOOL_SECRETS by mistake.
PLATFORM_SECRET_NAMES = frozenset({"SECRET_KEY", "DATABASE_URL", "REDIS_URL"})
PLATFORM_SECRET_PREFIXES = (
    "AGENTOPS_",
    "DJANGO_",
    "CELERY_",
    "SECRET_KEY",
    "DATABASE_",
    "OPENAI_",
    "EMAIL_",
    "PG",
)
# A variable whose name starts with this is a tool's secret without being listed.
TOOL_SECRET_PREFIX = "TOOL_SECRET_"


def platform_secret(name: str) -> bool:
    """Whether ``name`` is one of agentops' own variables, never a tool's to read."""
    return name in PLATFORM_SECRET_NAMES or name.startswith(PLATFORM_SECRET_PREFIXES)


def env_secret_names(name: str) -> list[str]:
    """A comma-separated list of environment variable names a tool may read as
    ``secret:NAME``; one of agentops' own (``platform_secret``) is refused by name."""
    names = env_list(name, [])
    for item in names:
        if not item.isidentifier() or not item.isascii():
            raise ImproperlyConfigured(f"{name}: {item!r} is not an environment variable name")
        if platform_secret(item):
            raise ImproperlyConfigured(
                f"{name}: {item} is one of agentops' own settings, which no tool may read; "
                f"give the tool a variable of its own (e.g. {TOOL_SECRET_PREFIX}{item})"
            )
    return names


# An entry of AGENTOPS_MCP_COMMANDS that starts with this allows its command exactly, with
# no further arguments; it is kept as the entry's first word.
EXACT_COMMAND_MARK = "="


def env_commands(name: str) -> list[list[str]]:
    """A comma-separated list of commands, each split into words as a shell would (so
    quote a word that holds a space or a comma: each entry is read with shlex). An entry
    that starts with ``=`` (``=npx -y @x/server /data``) allows that command exactly; it
    comes back with ``=`` as a word of its own before the command."""
    commands = []
    for item in env_list(name, []):
        try:
            words = shlex.split(item)
        except ValueError as error:
            raise ImproperlyConfigured(
                f"{name}: {item!r} cannot be split into words: {error}"
            ) from None
        if words and words[0].startswith(EXACT_COMMAND_MARK):
            rest = words[0][len(EXACT_COMMAND_MARK) :]
            words = [EXACT_COMMAND_MARK, *([rest] if rest else []), *words[1:]]
            if len(words) == 1:
                raise ImproperlyConfigured(f"{name}: the entry {item!r} names no command")
        if not words:
            raise ImproperlyConfigured(f"{name}: an entry names no command")
        commands.append(words)
    return commands


def env_provider_limits(name: str) -> dict:
    """``AGENTOPS_PROVIDER_LIMITS`` read (agentops.runtime.providers); a fault stops
    start-up with what is wrong, rather than running unlimited."""
    from agentops.runtime.providers import ProviderLimitsInvalid, limits_parse

    try:
        return limits_parse(env_str(name))
    except ProviderLimitsInvalid as error:
        raise ImproperlyConfigured(str(error)) from None


# SQLite must run in WAL with immediate transactions, or concurrent writers (web,
# worker) lose work to "database is locked" (see docs/decisions.md).
SQLITE_OPTIONS = {
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    "transaction_mode": "IMMEDIATE",
    "timeout": 20,
}


def postgres_options(name: str, url: str, query: dict[str, str]) -> dict[str, Any]:
    """The URL's query parameters as driver options; Django's ``server_side_binding``
    (true/false) and psycopg's ``prepare_threshold`` (a number, or none) are typed, as
    the driver needs them."""
    options: dict[str, Any] = dict(query)
    if "server_side_binding" in options:
        binding = options["server_side_binding"].lower()
        if binding not in {"true", "false"}:
            raise ImproperlyConfigured(f"{name}={url!r}: server_side_binding must be true or false")
        options["server_side_binding"] = binding == "true"
    if "prepare_threshold" in options:
        threshold = options["prepare_threshold"].lower()
        if threshold == "none":
            options["prepare_threshold"] = None
        elif threshold.isdigit():
            options["prepare_threshold"] = int(threshold)
        else:
            raise ImproperlyConfigured(
                f"{name}={url!r}: prepare_threshold must be a whole number or none"
            )
    return options


def database_from_url(name: str, url: str, *, base_dir: Path) -> dict:
    """Turn ``sqlite:///path`` or ``postgres://user:pw@host:port/db`` into DATABASES['x']."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        # sqlite:///relative/path  or sqlite:////absolute/path
        path = unquote(url[len("sqlite://") :])
        if (path.startswith("/") and not path.startswith("//")) or path.startswith("//"):
            path = path[1:]
        if not path:
            raise ImproperlyConfigured(f"{name}={url!r} names no SQLite file")
        file = Path(path) if Path(path).is_absolute() else base_dir / path
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(file),
            "OPTIONS": SQLITE_OPTIONS,
        }
    if scheme in {"postgres", "postgresql", "pgsql"}:
        database = unquote(parts.path.lstrip("/"))
        if not database:
            raise ImproperlyConfigured(f"{name}={url!r} names no database")
        query = dict(parse_qsl(parts.query))
        # Behind a pooler in transaction mode (PgBouncer), a server-side cursor (what
        # .iterator() reads with: the trail's exports) dies when another client takes the
        # connection between fetches: Django's own switch, which is not a driver option.
        no_cursors = query.pop("disable_server_side_cursors", "false").lower()
        if no_cursors not in {"true", "false"}:
            raise ImproperlyConfigured(
                f"{name}={url!r}: disable_server_side_cursors must be true or false"
            )
        if "pool" in query:
            raise ImproperlyConfigured(
                f"{name}={url!r}: pool is not supported (each process keeps its own "
                "connection); put PgBouncer in front instead, see docs/deploy.md"
            )
        options = postgres_options(name, url, query)
        try:
            port = parts.port
        except ValueError:
            raise ImproperlyConfigured(f"{name}={url!r} has a port that is not a number") from None
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": database,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(port or ""),
            "OPTIONS": options,
            "CONN_MAX_AGE": 0,
            "DISABLE_SERVER_SIDE_CURSORS": no_cursors == "true",
        }
    raise ImproperlyConfigured(
        f"{name}={url!r}: the scheme {scheme or '(none)'!r} is not supported; "
        "use sqlite:///path or postgres://user:password@host:port/database"
    )


def secret_key(*, debug: bool, key_file: Path) -> str:
    """SECRET_KEY from the environment; in development, one generated once and kept."""
    value = env_str("SECRET_KEY")
    if value:
        return value
    if not debug:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set: it is required when DEBUG is off "
            "(set DEBUG=true for development, where a key is generated for you)"
        )
    key_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Created private and exclusively: when web and worker start together, one
        # writes the key and the other reads that same key.
        descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return key_file.read_text().strip()
    value = secrets.token_urlsafe(50)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(value)
    return value
