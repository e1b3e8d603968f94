"""SQL tools: one query against a named database, with the call's arguments bound by the
driver as named parameters, never interpolated into the SQL.

    {"database": "ledger",                       # a DATABASES alias, or instead:
     "url": "postgres://app:{secret:LEDGER_PASSWORD}@db.internal/ledger",
     "query": "SELECT number, amount FROM invoice WHERE batch = %(batch)s",
     "mode": "read",                             # or "write"
     "row_limit": 100}                           # read tools only

Every call opens a connection of its own (sqlite3 or psycopg 3) and closes it: never one
of Django's, so the engine's transactions and the tool's never mix.

- A read tool runs in a read-only transaction that is rolled back: PostgreSQL's ``BEGIN
  READ ONLY``; SQLite opened ``mode=ro`` with ``PRAGMA query_only``. At most ``row_limit``
  rows come back, and ``truncated`` says whether there were more. Refusing queries that do
  not start with SELECT, WITH, VALUES, SHOW or EXPLAIN when the tool is saved is only a
  first line of defence; the read-only transaction is the guard.
- A write tool runs its statement in one transaction and commits. It is irreversible by
  default (``SIDE_EFFECT_BY_MODE``), and may never be declared read-only: that would let
  it run without a person at every autonomy level.
- Both are stopped after ``tool.timeout_seconds``: PostgreSQL's ``statement_timeout``;
  on SQLite a progress handler, and the busy timeout for locks.
- Exactly one statement per call: psycopg sends it with the extended protocol, and
  sqlite3 refuses more than one, so ``SELECT 1; COMMIT; UPDATE ...`` cannot escape the
  transaction.

A read-only transaction does not stop a function whose effects leave the database (say
dblink): give the tool's database user only what the tool needs. The query takes no
idempotency key, so a write tool's idempotency stays ``none``: a write interrupted before
its outcome was recorded then goes to a person instead of being made again.

Placeholders are psycopg's named ``%(name)s``; a literal ``%`` is written ``%%``. SQLite
receives the same query with each placeholder as ``:name``. Every parameter must be a
property of the tool's input schema, and is bound as a string, number, boolean or null.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, suppress
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from datetime import time as time_of_day
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit
from uuid import UUID

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, connections

from agentops.config import database_from_url
from agentops.runtime.secrets import (
    EMBEDDED,
    PREFIX,
    SecretMissing,
    config_resolve,
    secret_errors,
)
from agentops.runtime.tools.base import ToolContext, ToolError, ToolResult, arguments_errors

if TYPE_CHECKING:
    from tasks.models import Tool

CONFIG_KEYS = ("database", "url", "query", "mode", "row_limit")
MODES = ("read", "write")
# What a new sql tool's side_effect should be unless the operator says otherwise.
SIDE_EFFECT_BY_MODE = {"read": "read", "write": "irreversible"}
ROW_LIMIT_DEFAULT = 100
ROW_LIMIT_MAX = 10_000
READ_KEYWORDS = ("SELECT", "WITH", "VALUES", "SHOW", "EXPLAIN")
POSTGRES_ENGINES = ("django.db.backends.postgresql", "django.contrib.gis.db.backends.postgis")
SQLITE_ENGINES = ("django.db.backends.sqlite3", "django.contrib.gis.db.backends.spatialite")
# libpq keywords that say where to connect, and as whom. A tool's URL says that in its
# own parts; its query may not, or the check that keeps tools off agentops' own database
# (own_database) would look at one database while the tool connected to another.
TARGET_KEYWORDS = {
    "dbname",
    "host",
    "hostaddr",
    "port",
    "service",
    "servicefile",
    "user",
    "password",
    "passfile",
}
# Keys of a Django DATABASES entry's OPTIONS that are Django's own, not libpq's.
DJANGO_ONLY_OPTIONS = {"isolation_level", "server_side_binding", "pool", "assume_role"}

# One ``%`` token: ``%%``, ``%(name)s`` (or a malformed ``%(...)x``), or anything else.
PERCENT = re.compile(
    r"%(?:(?P<percent>%)|\((?P<name>[^)]*)\)(?P<conversion>.?)|(?P<other>.?))", re.S
)
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
LEADING_NOISE = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*", re.S)
FIRST_WORD = re.compile(r"[A-Za-z]+")
SCALARS = (str, int, float, bool, type(None))


# The query ---------------------------------------------------------------------------


def query_parameters(query: str) -> tuple[list[str], list[str]]:
    """The names of the query's ``%(name)s`` parameters, in first-use order, and what is
    wrong with its ``%`` signs."""
    names: list[str] = []
    problems: list[str] = []
    for match in PERCENT.finditer(query):
        if match["percent"]:
            continue
        name = match["name"]
        if name is None:
            shown = "%" + (match["other"] or "")
            if match["other"] == "s":
                problems.append("query: %s is a positional parameter; name it, as %(name)s")
            else:
                problems.append(f"query: {shown!r} is not a parameter; write a literal % as %%")
        elif not IDENTIFIER.fullmatch(name):
            problems.append(
                f"query: %({name})s: a parameter's name is letters, digits and underscores"
            )
        elif match["conversion"] != "s":
            problems.append(f"query: write the parameter {name} as %({name})s")
        elif name not in names:
            names.append(name)
    return names, problems


def query_for_sqlite(query: str) -> str:
    """The query in sqlite3's named style: ``%(name)s`` becomes ``:name``, ``%%`` a ``%``.
    Only placeholder syntax changes; the values are still bound by the driver."""
    return PERCENT.sub(lambda m: "%" if m["percent"] else f":{m['name']}", query)


def query_first_word(query: str) -> str:
    """The statement's first keyword, past whitespace, comments and opening brackets."""
    match = FIRST_WORD.match(query, LEADING_NOISE.match(query).end())
    return match.group(0).upper() if match else ""


def query_schema_errors(config: dict, input_schema: dict) -> list[str]:
    """Every parameter of the query that the tool's input schema does not declare (a
    check for the form that saves a tool, where both are known)."""
    names, _ = query_parameters(config.get("query") or "")
    properties = (input_schema or {}).get("properties") or {}
    return [
        f"query: the parameter %({name})s is not a property of the tool's input schema"
        for name in names
        if name not in properties
    ]


# The database -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A database a call connects to: a Django-style settings entry, and how messages
    name it (never with its password)."""

    vendor: str  # "postgresql" or "sqlite"
    settings: dict
    label: str


@dataclass(frozen=True)
class SqlCall:
    """One call: the query as configured, the values to bind, and its limits."""

    query: str
    parameters: dict[str, Any]
    read: bool
    row_limit: int
    timeout: float

    @property
    def limit_words(self) -> str:
        return f"the tool's {self.timeout:g}-second limit"


def vendor_of(engine: str) -> str:
    if engine in POSTGRES_ENGINES:
        return "postgresql"
    if engine in SQLITE_ENGINES:
        return "sqlite"
    return ""


def alias_errors(alias: Any) -> list[str]:
    if not isinstance(alias, str) or not alias:
        return ["database: name a DATABASES alias, as a string"]
    if alias not in settings.DATABASES:
        known = ", ".join(sorted(settings.DATABASES))
        return [f"database: {alias!r} is not a DATABASES alias (known: {known})"]
    entry = settings.DATABASES[alias]
    if not vendor_of(entry.get("ENGINE", "")):
        return [
            f"database: {alias!r} uses {entry.get('ENGINE')!r}; sql tools support "
            "PostgreSQL and SQLite"
        ]
    if vendor_of(entry["ENGINE"]) == "sqlite" and str(entry.get("NAME", "")) in ("", ":memory:"):
        return [f"database: {alias!r} is an in-memory SQLite database, which a tool cannot see"]
    if own_database(entry):
        return [f"database: {alias!r} {OWN_DATABASE_REFUSAL}"]
    return []


OWN_DATABASE_REFUSAL = (
    "is agentops' own database, with the runs, the approvals and the autonomy dial: an "
    "agent must not reach it. Point the tool at the database it needs"
)


def own_database(entry: dict) -> bool:
    """Whether a settings entry names agentops' own database (the live ``default``
    connection's), unless AGENTOPS_SQL_OWN_DATABASE allows it. Compared by identity, not
    spelling: SQLite files by device and inode (so a hard link or a symlink is the same
    file); PostgreSQL by server (every address a host resolves to, any address of this
    machine and any Unix socket counting as the local server), port and database name.
    At call time ``postgres_run`` asks the server itself as well (``server_identity``)."""
    if settings.AGENTOPS_SQL_OWN_DATABASE:
        return False
    own = connections[DEFAULT_DB_ALIAS].settings_dict
    vendor = vendor_of(entry.get("ENGINE", ""))
    if vendor != vendor_of(own.get("ENGINE", "")):
        return False
    if vendor == "sqlite":
        return same_file(str(entry.get("NAME")), str(own["NAME"]))
    return (
        postgres_database(entry) == postgres_database(own)
        and bool(postgres_ports(entry) & postgres_ports(own))
        and bool(postgres_servers(entry) & postgres_servers(own))
    )


def same_file(path: str, other: str) -> bool:
    """Whether two paths are one file: (st_dev, st_ino) of what each leads to; by the
    resolved path while one does not exist yet."""
    try:
        first, second = os.stat(path), os.stat(other)
    except OSError:
        return os.path.realpath(path) == os.path.realpath(other)
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def postgres_database(entry: dict) -> str:
    """The database libpq connects to: the entry's name, else PGDATABASE, else the user's."""
    return str(
        entry.get("NAME")
        or os.environ.get("PGDATABASE")
        or entry.get("USER")
        or os.environ.get("PGUSER")
        or ""
    )


def postgres_ports(entry: dict) -> set[str]:
    """The ports libpq may try (a comma-separated list is one per host)."""
    port = str(entry.get("PORT") or os.environ.get("PGPORT") or "5432")
    return {part.strip() or "5432" for part in port.split(",")}


LOCAL_SERVER = "local"
RESOLVE_SECONDS = 5.0


def postgres_servers(entry: dict) -> set[str]:
    """Where libpq may connect, as server identities: ``LOCAL_SERVER`` for a Unix socket
    (no host, a directory, an abstract socket) or any address of this machine, and each
    other address a host resolves to. A host that cannot be resolved adds nothing (it
    cannot be reached either; the server is asked at call time in any case)."""
    hosts = str(entry.get("HOST") or os.environ.get("PGHOST") or "")
    servers: set[str] = set()
    for host in (unquote(part.strip()) for part in hosts.split(",")):
        if not host or host.startswith(("/", "@")):
            servers.add(LOCAL_SERVER)
            continue
        servers.update(address_identity(address) for address in host_addresses(host))
    return servers


def host_addresses(host: str) -> list[str]:
    """Every address ``host`` resolves to, within RESOLVE_SECONDS (the system resolver
    has no timeout of its own, so it runs in a thread we stop waiting for)."""
    answer: list[Any] = []

    def lookup() -> None:
        with suppress(OSError, UnicodeError):
            answer.extend(info[4][0] for info in socket.getaddrinfo(host, None))

    thread = threading.Thread(target=lookup, daemon=True, name="sql-tool-resolve")
    thread.start()
    thread.join(RESOLVE_SECONDS)
    return list(answer)


def address_identity(address: str) -> str:
    """An address as a server identity: ``LOCAL_SERVER`` for any address of this machine
    (loopback, unspecified, or one it can bind to), else the address itself."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:
        return LOCAL_SERVER
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))  # only an address of this machine can be bound
    except OSError:
        return str(ip)
    return LOCAL_SERVER


# The start time as seconds since the epoch: as text, a timestamp would follow each
# session's TimeZone, and agentops' connection and a tool's may differ.
IDENTITY_QUERY = (
    "SELECT extract(epoch FROM pg_postmaster_start_time())::text, current_database(), "
    "(SELECT oid FROM pg_database WHERE datname = current_database())::text"
)


def server_identity(cursor: Any) -> tuple:
    """The server and database a connection reached, as the server itself says: when it
    started (to the microsecond) and the database's name and oid. Any role may ask."""
    cursor.execute(IDENTITY_QUERY)
    return tuple(cursor.fetchone())


def own_server_identity() -> tuple | None:
    """``server_identity`` of agentops' own PostgreSQL database, asked now (a restart
    changes it), or None when it is not PostgreSQL."""
    own = connections[DEFAULT_DB_ALIAS]
    if own.vendor != "postgresql":
        return None
    with own.cursor() as cursor:
        return server_identity(cursor)


def url_errors(url: Any) -> list[str]:
    if not isinstance(url, str) or not url.strip():
        return ["url: give a URL, as a string: sqlite:///path or postgres://user@host/database"]
    if url.startswith(PREFIX):
        return []  # the whole URL is a secret: it can only be checked when it is read
    # Each {secret:NAME} stands for a value that can only be checked at call time.
    placeholder = EMBEDDED.sub("secret", url)
    try:
        entry = database_from_url("url", placeholder, base_dir=settings.BASE_DIR)
    except ImproperlyConfigured as error:
        return [str(error)]
    targets = sorted(TARGET_KEYWORDS & set(entry.get("OPTIONS") or {}))
    if entry["ENGINE"] in POSTGRES_ENGINES and targets:
        return [
            f"url: the query may not set {', '.join(targets)}: say where to connect in the "
            "URL itself (postgres://user:{secret:NAME}@host:port/database)"
        ]
    if own_database(entry):
        return [f"url: the database it names {OWN_DATABASE_REFUSAL}"]
    password = urlsplit(url).password
    if password and not EMBEDDED.fullmatch(password):
        return [
            "url: the password is written out; name it as {secret:NAME} so it is read from "
            "the environment at call time and never stored"
        ]
    return []


def url_resolve(url: str) -> str:
    """The URL with its secrets read from the environment. An embedded secret is
    percent-encoded, so a password with ``@``, ``/`` or ``:`` cannot change the URL's
    shape (the parser decodes it again)."""
    if url.startswith(PREFIX):
        return config_resolve(url)[0]
    return EMBEDDED.sub(lambda m: quote(config_resolve(PREFIX + m.group(1))[0], safe=""), url)


def target_for(config: dict) -> Target:
    """The database the config names, with secrets resolved now. Raises SecretMissing,
    or ToolError when a resolved URL cannot be used."""
    if "database" in config:
        alias = config["database"]
        entry = settings.DATABASES[alias]
        if own_database(entry):
            raise ToolError(f"the database {alias!r} {OWN_DATABASE_REFUSAL}; the call was not made")
        return Target(vendor_of(entry["ENGINE"]), entry, f"the database {alias!r}")
    try:
        entry = database_from_url("url", url_resolve(config["url"]), base_dir=settings.BASE_DIR)
    except ImproperlyConfigured:
        # Not the parser's message: it quotes the URL, with the password just resolved.
        raise ToolError(
            "the tool's URL, with its secrets filled in, is not a database URL"
        ) from None
    targets = sorted(TARGET_KEYWORDS & set(entry.get("OPTIONS") or {}))
    if entry["ENGINE"] in POSTGRES_ENGINES and targets:
        raise ToolError(
            f"the tool's URL sets {', '.join(targets)} in its query, which must be said in "
            "the URL itself; the call was not made"
        )
    if own_database(entry):
        raise ToolError(f"the tool's URL {OWN_DATABASE_REFUSAL}; the call was not made")
    vendor = vendor_of(entry["ENGINE"])
    if vendor == "sqlite":
        label = f"the SQLite file {os.path.basename(entry['NAME'])}"
    else:
        label = f"the database {entry['NAME']!r} on {entry['HOST'] or 'localhost'}"
    return Target(vendor, entry, label)


# Values -------------------------------------------------------------------------------


def column_names(names: list[str]) -> list[str]:
    """Column names as dict keys: a repeated name gets ``_2``, ``_3``... so no column is
    silently dropped (``SELECT a.id, b.id``)."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique


def cell_plain(value: Any) -> Any:
    """A value the engine can record as JSON: kept when its encoder knows the type,
    bytes as ``\\x`` and hex (PostgreSQL's own text form), anything else as text."""
    if isinstance(value, (*SCALARS, Decimal, datetime, date, time_of_day, timedelta, UUID)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, (list, tuple)):
        return [cell_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): cell_plain(item) for key, item in value.items()}
    return str(value)


def read_result(rows: Iterator[dict], row_limit: int) -> dict:
    kept = []
    for row in rows:
        if len(kept) == row_limit:
            return {"rows": kept, "row_count": len(kept), "truncated": True}
        kept.append(row)
    return {"rows": kept, "row_count": len(kept), "truncated": False}


# The executor -------------------------------------------------------------------------


class SqlExecutor:
    """Runs the one query a tool's config names. A call that is refused here (a bad
    config, a write declared read-only, a missing secret) never reaches the database."""

    def config_errors(self, config: dict) -> list[str]:
        if not isinstance(config, dict):
            return ["the config must be a JSON object"]
        errors = [
            f"{key}: not a setting of sql tools (they take {', '.join(CONFIG_KEYS)})"
            for key in config
            if key not in CONFIG_KEYS
        ]
        has_database, has_url = "database" in config, "url" in config
        if has_database and has_url:
            errors.append("give either database (a DATABASES alias) or url, not both")
        elif has_database:
            errors.extend(alias_errors(config["database"]))
        elif has_url:
            errors.extend(url_errors(config["url"]))
        else:
            errors.append("database or url: name the database, as a DATABASES alias or a URL")
        errors.extend(secret_errors(config))

        mode = config.get("mode")
        if mode not in MODES:
            errors.append(
                f"mode: {mode!r} is not read or write" if mode else "mode: say read or write"
            )
        if "row_limit" in config:
            row_limit = config["row_limit"]
            if mode == "write":
                errors.append("row_limit: only read tools return rows")
            elif (
                not isinstance(row_limit, int)
                or isinstance(row_limit, bool)
                or not 1 <= row_limit <= ROW_LIMIT_MAX
            ):
                errors.append(
                    f"row_limit: {row_limit!r} is not a whole number from 1 to {ROW_LIMIT_MAX}"
                )

        query = config.get("query")
        if not isinstance(query, str) or not query.strip():
            errors.append("query: give the SQL statement, as a string")
            return errors
        errors.extend(query_parameters(query)[1])
        first = query_first_word(query)
        if mode == "read" and first not in READ_KEYWORDS:
            errors.append(
                f"query: a read tool's query must start with {', '.join(READ_KEYWORDS[:-1])} "
                f"or {READ_KEYWORDS[-1]}, not {first or 'nothing'}; to change data, make it a "
                "write tool"
            )
        return errors

    def validate(self, tool: Tool, arguments: dict) -> list[str]:
        errors = arguments_errors(tool.input_schema, arguments)
        names, _ = query_parameters((tool.config or {}).get("query") or "")
        errors.extend(query_schema_errors(tool.config or {}, tool.input_schema))
        if not isinstance(arguments, dict):
            return errors
        for name in names:
            if name not in arguments:
                errors.append(f"{name}: the query's parameter %({name})s has no argument")
            elif not isinstance(arguments[name], SCALARS):
                errors.append(
                    f"{name}: a query parameter is a string, number, boolean or null, not "
                    f"{type(arguments[name]).__name__}"
                )
        return errors

    def execute(self, tool: Tool, arguments: dict, context: ToolContext) -> ToolResult:
        config = tool.config or {}
        problems = self.config_errors(config)
        if problems:
            return ToolResult(
                ok=False, error=f"the tool {tool.name} is misconfigured: " + "; ".join(problems)
            )
        mode = config["mode"]
        if mode == "write" and tool.side_effect == "read":
            return ToolResult(
                ok=False,
                error=f"the tool {tool.name} writes but is declared read-only, so it would run "
                "without a person at every autonomy level; it was not called (declare it "
                "irreversible or reversible)",
            )
        names, _ = query_parameters(config["query"])
        missing = [name for name in names if name not in arguments]
        if missing:
            return ToolResult(ok=False, error=f"no argument for {', '.join(missing)}")
        parameters = {name: arguments[name] for name in names}
        call = SqlCall(
            query=config["query"],
            parameters=parameters,
            read=mode == "read",
            row_limit=config.get("row_limit", ROW_LIMIT_DEFAULT),
            timeout=float(tool.timeout_seconds),
        )
        try:
            target = target_for(config)
            run = postgres_run if target.vendor == "postgresql" else sqlite_run
            value = run(target, call)
        except SecretMissing as error:
            return ToolResult(ok=False, error=str(error))
        except ToolError as error:
            return ToolResult(ok=False, error=str(error), transient=error.transient)
        return ToolResult(ok=True, value=value)


def refusal(target: Target, what: str, detail: str) -> ToolError:
    """A failure the database reported while running the query."""
    return ToolError(f"{target.label} {what}: {detail}")


def stopped(target: Target, call: SqlCall, why: str) -> ToolError:
    """A query stopped by the time limit or a lock. Either way it was rolled back, but only
    a read is retried on its own: a write that overran goes back to the model (and the
    people watching) rather than being sent again into a database already under strain."""
    return ToolError(f"{target.label}: {why}, so the query was stopped", transient=call.read)


# PostgreSQL ---------------------------------------------------------------------------


def postgres_connect_arguments(entry: dict, timeout: float) -> dict[str, Any]:
    from psycopg import pq

    libpq_keywords = {option.keyword.decode() for option in pq.Conninfo.get_defaults()}
    options = {
        key: value
        for key, value in (entry.get("OPTIONS") or {}).items()
        if key in libpq_keywords and key not in DJANGO_ONLY_OPTIONS
    }
    arguments = {
        **{key: value for key, value in options.items() if key not in TARGET_KEYWORDS},
        # Where to connect is the URL's, never an option's (see TARGET_KEYWORDS).
        "dbname": entry.get("NAME"),
        "user": entry.get("USER"),
        "password": entry.get("PASSWORD"),
        "host": entry.get("HOST"),
        "port": str(entry.get("PORT") or ""),
        # libpq counts whole seconds, and takes anything under 2 as 2.
        "connect_timeout": max(2, math.ceil(timeout)),
        "application_name": "agentops sql tool",
    }
    return {key: value for key, value in arguments.items() if value not in (None, "")}


def postgres_rows(cursor: Any) -> Callable[[Any], dict]:
    """A psycopg row factory: each row as a dict of plain values by unique column name."""
    names = column_names([column.name for column in cursor.description or []])

    def make(values: Any) -> dict:
        return {name: cell_plain(value) for name, value in zip(names, values, strict=True)}

    return make


def postgres_run(target: Target, call: SqlCall) -> dict:
    import psycopg
    from psycopg import errors

    try:
        # Autocommit: the transaction is begun and ended here in plain sight, and psycopg
        # opens none of its own. Closing the connection drops whatever is still open.
        connection = psycopg.connect(
            **postgres_connect_arguments(target.settings, call.timeout), autocommit=True
        )
    except psycopg.Error as error:
        # Nothing was sent: always safe to try again.
        raise ToolError(f"could not connect to {target.label}: {error}", transient=True) from None
    committing = False
    try:
        if not settings.AGENTOPS_SQL_OWN_DATABASE:
            # Whatever the URL's spelling (or the DNS answer at connect time), the server
            # says who it is before the tool's statement is sent.
            with connection.cursor() as cursor:
                reached = server_identity(cursor)
            if reached == own_server_identity():
                raise ToolError(f"{target.label} {OWN_DATABASE_REFUSAL}; the call was not made")
        with connection.cursor(row_factory=postgres_rows) as cursor:
            cursor.execute("BEGIN READ ONLY" if call.read else "BEGIN")
            cursor.execute(
                "SELECT set_config('statement_timeout', %s, true)",
                [f"{max(1, round(call.timeout * 1000))}ms"],
            )
            if call.read:
                # Streamed row by row (memory stays bounded), always with the extended
                # protocol, which takes one statement only.
                with closing(cursor.stream(call.query, call.parameters)) as rows:
                    value = read_result(rows, call.row_limit)
                cursor.execute("ROLLBACK")
                return value
            # prepare=True: the extended protocol, so one statement only.
            cursor.execute(call.query, call.parameters, prepare=True)
            value = {"row_count": cursor.rowcount}
            if cursor.description is not None:  # INSERT ... RETURNING
                value["rows"] = cursor.fetchall()
            committing = True
            cursor.execute("COMMIT")
            return value
    except (errors.QueryCanceled, errors.LockNotAvailable) as error:
        why = (
            f"it ran past {call.limit_words}"
            if isinstance(error, errors.QueryCanceled)
            else "a lock it needed was not free"
        )
        raise stopped(target, call, why) from None
    except (errors.SerializationFailure, errors.DeadlockDetected) as error:
        raise ToolError(
            f"{target.label} rolled the query back ({postgres_error_name(error)}): "
            f"{postgres_message(error)}",
            transient=call.read,
        ) from None
    except errors.ReadOnlySqlTransaction as error:
        raise refusal(
            target, "refused a change through a read tool", postgres_message(error)
        ) from None
    except errors.IntegrityError as error:
        raise refusal(
            target, f"refused the change ({postgres_error_name(error)})", postgres_message(error)
        ) from None
    except psycopg.OperationalError as error:
        if committing:
            raise ToolError(
                f"the connection to {target.label} failed while committing, so the write may "
                f"or may not have taken effect: {error}"
            ) from None
        # The transaction died with the connection, uncommitted.
        raise ToolError(
            f"the connection to {target.label} failed: {error}", transient=call.read
        ) from None
    except psycopg.Error as error:
        raise refusal(
            target, f"refused the query ({postgres_error_name(error)})", postgres_message(error)
        ) from None
    finally:
        connection.close()


def postgres_error_name(error: Exception) -> str:
    sqlstate = getattr(error, "sqlstate", None)
    return f"{type(error).__name__}, SQLSTATE {sqlstate}" if sqlstate else type(error).__name__


def postgres_message(error: Exception) -> str:
    diag = getattr(error, "diag", None)
    message = (diag.message_primary if diag else None) or str(error)
    detail = diag.message_detail if diag else None
    return f"{message} ({detail})" if detail else message


# SQLite -------------------------------------------------------------------------------


def sqlite_run(target: Target, call: SqlCall) -> dict:
    path = os.path.abspath(str(target.settings["NAME"]))
    # ro: the file cannot be written through this connection; rw: a missing file is an
    # error, never a new empty database.
    uri = f"file:{quote(path)}?mode={'ro' if call.read else 'rw'}"
    deadline = time.monotonic() + call.timeout
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=call.timeout, isolation_level=None)
    except sqlite3.Error as error:
        raise ToolError(f"could not open {target.label}: {error}") from None
    try:
        if call.read:
            connection.execute("PRAGMA query_only = ON")
        # Checked every thousand virtual-machine steps; returning True interrupts.
        connection.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
        cursor = connection.cursor()
        cursor.execute("BEGIN" if call.read else "BEGIN IMMEDIATE")
        cursor.execute(query_for_sqlite(call.query), call.parameters)
        names = column_names([column[0] for column in cursor.description or []])
        rows = (
            {name: cell_plain(value) for name, value in zip(names, row, strict=True)}
            for row in cursor
        )
        if call.read:
            value = read_result(rows, call.row_limit)
            connection.set_progress_handler(None, 0)
            cursor.execute("ROLLBACK")
            return value
        returned = list(rows) if cursor.description is not None else None
        value = {"row_count": cursor.rowcount}
        if returned is not None:  # INSERT ... RETURNING
            value["rows"] = returned
        # The statement is done in time; its commit must not be interrupted half-way.
        connection.set_progress_handler(None, 0)
        cursor.execute("COMMIT")
        return value
    except sqlite3.Error as error:
        raise sqlite_failure(target, call, error) from None
    except OverflowError:
        # Raised by sqlite3 while binding, before the statement ran.
        raise ToolError(
            f"{target.label} refused the query: a number is too large for SQLite's 64-bit integers"
        ) from None
    finally:
        connection.close()  # rolls back whatever is still open


def sqlite_failure(target: Target, call: SqlCall, error: sqlite3.Error) -> ToolError:
    code = getattr(error, "sqlite_errorname", None) or type(error).__name__
    if code == "SQLITE_INTERRUPT":
        return stopped(target, call, f"it ran past {call.limit_words}")
    if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return stopped(target, call, f"the database stayed locked past {call.limit_words}")
    if code.startswith("SQLITE_READONLY") and call.read:
        return refusal(target, "refused a change through a read tool", f"{code}: {error}")
    if code.startswith("SQLITE_CONSTRAINT"):
        return refusal(target, "refused the change", f"{code}: {error}")
    return refusal(target, "refused the query", f"{code}: {error}")
