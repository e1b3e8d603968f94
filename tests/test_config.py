"""The settings helpers: each reads one environment variable and fails loudly, naming it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from agentops.config import (
    database_from_url,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    secret_key,
)

REPO = Path(__file__).resolve().parent.parent


# Booleans, numbers, choices ----------------------------------------------------------


@pytest.mark.parametrize("word", ["1", "true", "TRUE", "yes", "On", " true "])
def test_env_bool_accepts_true_words(monkeypatch, word):
    monkeypatch.setenv("AGENTOPS_TEST_FLAG", word)
    assert env_bool("AGENTOPS_TEST_FLAG") is True


@pytest.mark.parametrize("word", ["0", "false", "No", "OFF", ""])
def test_env_bool_accepts_false_words(monkeypatch, word):
    monkeypatch.setenv("AGENTOPS_TEST_FLAG", word)
    assert env_bool("AGENTOPS_TEST_FLAG", default=True) is False


def test_env_bool_unset_is_the_default(monkeypatch):
    monkeypatch.delenv("AGENTOPS_TEST_FLAG", raising=False)
    assert env_bool("AGENTOPS_TEST_FLAG") is False
    assert env_bool("AGENTOPS_TEST_FLAG", default=True) is True


def test_env_bool_names_the_variable_and_the_bad_value(monkeypatch):
    monkeypatch.setenv("AGENTOPS_TEST_FLAG", "maybe")
    with pytest.raises(ImproperlyConfigured) as caught:
        env_bool("AGENTOPS_TEST_FLAG")

    message = str(caught.value)
    assert "AGENTOPS_TEST_FLAG" in message
    assert "'maybe'" in message
    assert "true" in message and "false" in message


def test_env_int_reads_a_whole_number(monkeypatch):
    monkeypatch.setenv("AGENTOPS_TEST_NUMBER", " 42 ")
    assert env_int("AGENTOPS_TEST_NUMBER", 1, minimum=1) == 42


def test_env_int_unset_or_blank_is_the_default(monkeypatch):
    monkeypatch.delenv("AGENTOPS_TEST_NUMBER", raising=False)
    assert env_int("AGENTOPS_TEST_NUMBER", 7) == 7
    monkeypatch.setenv("AGENTOPS_TEST_NUMBER", "  ")
    assert env_int("AGENTOPS_TEST_NUMBER", 7) == 7


@pytest.mark.parametrize("raw", ["two", "2.5", "1e3"])
def test_env_int_rejects_what_is_not_a_whole_number(monkeypatch, raw):
    monkeypatch.setenv("AGENTOPS_TEST_NUMBER", raw)
    with pytest.raises(ImproperlyConfigured) as caught:
        env_int("AGENTOPS_TEST_NUMBER", 1)

    assert "AGENTOPS_TEST_NUMBER" in str(caught.value)
    assert repr(raw) in str(caught.value)
    assert "not a whole number" in str(caught.value)


def test_env_int_rejects_a_value_under_the_minimum(monkeypatch):
    monkeypatch.setenv("AGENTOPS_TEST_NUMBER", "0")
    with pytest.raises(ImproperlyConfigured) as caught:
        env_int("AGENTOPS_TEST_NUMBER", 2, minimum=1)

    assert "AGENTOPS_TEST_NUMBER" in str(caught.value)
    assert "at least 1" in str(caught.value)


def test_env_int_accepts_the_minimum_itself(monkeypatch):
    monkeypatch.setenv("AGENTOPS_TEST_NUMBER", "1")
    assert env_int("AGENTOPS_TEST_NUMBER", 2, minimum=1) == 1


def test_env_float_reads_a_number(monkeypatch):
    monkeypatch.setenv("AGENTOPS_TEST_SECONDS", "2.5")
    assert env_float("AGENTOPS_TEST_SECONDS", 60.0, minimum=1.0) == 2.5


def test_env_float_rejects_what_is_not_a_number(monkeypatch):
    monkeypatch.setenv("AGENTOPS_TEST_SECONDS", "a minute")
    with pytest.raises(ImproperlyConfigured) as caught:
        env_float("AGENTOPS_TEST_SECONDS", 60.0)

    assert "AGENTOPS_TEST_SECONDS" in str(caught.value)
    assert "'a minute'" in str(caught.value)
    assert "not a number" in str(caught.value)


def test_env_float_rejects_a_value_under_the_minimum(monkeypatch):
    monkeypatch.setenv("AGENTOPS_TEST_SECONDS", "0.5")
    with pytest.raises(ImproperlyConfigured) as caught:
        env_float("AGENTOPS_TEST_SECONDS", 60.0, minimum=1.0)

    assert "AGENTOPS_TEST_SECONDS" in str(caught.value)
    assert "at least 1.0" in str(caught.value)


def test_env_choice_reads_a_choice_in_any_case(monkeypatch):
    monkeypatch.setenv("AGENTOPS_TEST_QUEUE", " Celery ")
    assert env_choice("AGENTOPS_TEST_QUEUE", ("q2", "celery"), "q2") == "celery"


def test_env_choice_unset_or_blank_is_the_default(monkeypatch):
    monkeypatch.delenv("AGENTOPS_TEST_QUEUE", raising=False)
    assert env_choice("AGENTOPS_TEST_QUEUE", ("q2", "celery"), "q2") == "q2"
    monkeypatch.setenv("AGENTOPS_TEST_QUEUE", "")
    assert env_choice("AGENTOPS_TEST_QUEUE", ("q2", "celery"), "q2") == "q2"


def test_env_choice_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv("AGENTOPS_TEST_QUEUE", "rabbit")
    with pytest.raises(ImproperlyConfigured) as caught:
        env_choice("AGENTOPS_TEST_QUEUE", ("q2", "celery"), "q2")

    message = str(caught.value)
    assert "AGENTOPS_TEST_QUEUE" in message and "'rabbit'" in message
    assert "q2, celery" in message


def test_env_list_splits_on_commas_and_drops_blanks(monkeypatch):
    monkeypatch.setenv("AGENTOPS_TEST_HOSTS", " a.example , b.example,, ")
    assert env_list("AGENTOPS_TEST_HOSTS", ["default"]) == ["a.example", "b.example"]
    monkeypatch.delenv("AGENTOPS_TEST_HOSTS")
    assert env_list("AGENTOPS_TEST_HOSTS", ["default"]) == ["default"]


# Database URLs -----------------------------------------------------------------------


def test_a_relative_sqlite_path_is_resolved_against_the_base_dir(tmp_path):
    database = database_from_url("DATABASE_URL", "sqlite:///var/app.sqlite3", base_dir=tmp_path)

    assert database["ENGINE"] == "django.db.backends.sqlite3"
    assert database["NAME"] == str(tmp_path / "var" / "app.sqlite3")
    assert database["OPTIONS"]["transaction_mode"] == "IMMEDIATE"
    assert "journal_mode=WAL" in database["OPTIONS"]["init_command"]


def test_an_absolute_sqlite_path_is_kept(tmp_path):
    database = database_from_url(
        "DATABASE_URL", "sqlite:////srv/agentops/db.sqlite3", base_dir=tmp_path
    )
    assert database["NAME"] == "/srv/agentops/db.sqlite3"


def test_a_sqlite_url_without_a_path_is_refused(tmp_path):
    with pytest.raises(ImproperlyConfigured, match=r"DATABASE_URL=.*names no SQLite file"):
        database_from_url("DATABASE_URL", "sqlite:///", base_dir=tmp_path)


def test_a_postgres_url_gives_every_field_and_decodes_the_password(tmp_path):
    database = database_from_url(
        "DATABASE_URL",
        "postgres://agent:p%40ss%2Fw%3Ard@db.internal:5433/agentops?sslmode=require",
        base_dir=tmp_path,
    )

    assert database["ENGINE"] == "django.db.backends.postgresql"
    assert database["NAME"] == "agentops"
    assert database["USER"] == "agent"
    assert database["PASSWORD"] == "p@ss/w:rd"
    assert database["HOST"] == "db.internal"
    assert database["PORT"] == "5433"
    assert database["OPTIONS"] == {"sslmode": "require"}


@pytest.mark.parametrize(
    ("query", "options"),
    [
        ("prepare_threshold=none", {"prepare_threshold": None}),
        ("prepare_threshold=5", {"prepare_threshold": 5}),
        ("server_side_binding=true", {"server_side_binding": True}),
        ("server_side_binding=FALSE", {"server_side_binding": False}),
    ],
)
def test_a_postgres_url_gives_the_driver_options_their_types(tmp_path, query, options):
    url = f"postgres://u@pooler:6432/agentops?{query}"
    assert database_from_url("DATABASE_URL", url, base_dir=tmp_path)["OPTIONS"] == options


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("server_side_binding=yes", "server_side_binding must be true or false"),
        ("prepare_threshold=-1", "prepare_threshold must be a whole number or none"),
        ("prepare_threshold=often", "prepare_threshold must be a whole number or none"),
        ("disable_server_side_cursors=1", "disable_server_side_cursors must be true or false"),
        ("pool=true", "pool is not supported"),
    ],
)
def test_a_postgres_url_with_a_bad_driver_option_is_refused(tmp_path, query, problem):
    with pytest.raises(ImproperlyConfigured, match=rf"DATABASE_URL=.*{problem}"):
        database_from_url("DATABASE_URL", f"postgres://u@h/agentops?{query}", base_dir=tmp_path)


def test_a_postgres_url_can_turn_server_side_cursors_off_for_a_pooler(tmp_path):
    """PgBouncer in transaction mode: Django's switch, set from the URL, not a driver
    option (psycopg would refuse an option it does not know at the first connection)."""
    url = "postgres://u@pooler:6432/agentops?prepare_threshold=none"
    database = database_from_url("DATABASE_URL", url, base_dir=tmp_path)
    assert database["DISABLE_SERVER_SIDE_CURSORS"] is False
    database = database_from_url(
        "DATABASE_URL", url + "&disable_server_side_cursors=TRUE", base_dir=tmp_path
    )
    assert database["DISABLE_SERVER_SIDE_CURSORS"] is True
    assert database["OPTIONS"] == {"prepare_threshold": None}


def test_a_postgres_url_without_a_port_leaves_it_blank(tmp_path):
    database = database_from_url(
        "DATABASE_URL", "postgresql://u@localhost/agentops", base_dir=tmp_path
    )
    assert database["PORT"] == ""
    assert database["PASSWORD"] == ""


def test_a_postgres_url_without_a_database_is_refused(tmp_path):
    with pytest.raises(ImproperlyConfigured) as caught:
        database_from_url("DATABASE_URL", "postgres://user:pw@host:5433/", base_dir=tmp_path)

    assert "DATABASE_URL" in str(caught.value)
    assert "names no database" in str(caught.value)


def test_a_postgres_url_with_a_bad_port_is_refused(tmp_path):
    with pytest.raises(ImproperlyConfigured, match=r"DATABASE_URL=.*port that is not a number"):
        database_from_url("DATABASE_URL", "postgres://user:pw@host:port/db", base_dir=tmp_path)


@pytest.mark.parametrize("url", ["mysql://user:pw@host/db", "agentops.sqlite3"])
def test_an_unknown_database_scheme_names_the_variable_and_the_forms(tmp_path, url):
    with pytest.raises(ImproperlyConfigured) as caught:
        database_from_url("DATABASE_URL", url, base_dir=tmp_path)

    message = str(caught.value)
    assert "DATABASE_URL" in message
    assert "not supported" in message
    assert "sqlite:///path" in message
    assert "postgres://user:password@host:port/database" in message


# The secret key ----------------------------------------------------------------------


def test_the_secret_key_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SECRET_KEY", "from-the-environment")
    key_file = tmp_path / "secret_key"

    assert secret_key(debug=False, key_file=key_file) == "from-the-environment"
    assert secret_key(debug=True, key_file=key_file) == "from-the-environment"
    assert not key_file.exists()


def test_the_secret_key_is_required_when_debug_is_off(monkeypatch, tmp_path):
    monkeypatch.delenv("SECRET_KEY", raising=False)
    key_file = tmp_path / "secret_key"

    with pytest.raises(ImproperlyConfigured, match="SECRET_KEY is not set"):
        secret_key(debug=False, key_file=key_file)
    assert not key_file.exists()


def test_a_development_key_is_generated_once_and_kept_private(monkeypatch, tmp_path):
    monkeypatch.delenv("SECRET_KEY", raising=False)
    key_file = tmp_path / "var" / "secret_key"

    first = secret_key(debug=True, key_file=key_file)
    second = secret_key(debug=True, key_file=key_file)

    assert len(first) >= 50
    assert second == first
    assert key_file.read_text() == first
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


# Start-up with a bad environment -----------------------------------------------------


def manage_check(tmp_path: Path, **changes: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="agentops.settings",
        AGENTOPS_VAR_DIR=str(tmp_path / "var"),
    )
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_start_up_refuses_a_debug_value_that_is_not_a_boolean(tmp_path):
    result = manage_check(tmp_path, DEBUG="maybe", SECRET_KEY="a-key-for-this-test")

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "DEBUG='maybe' is not a boolean" in result.stderr


def test_start_up_without_debug_requires_a_secret_key(tmp_path):
    result = manage_check(tmp_path, DEBUG="false", SECRET_KEY=None)

    assert result.returncode != 0
    assert "SECRET_KEY is not set" in result.stderr
    assert not (tmp_path / "var" / "secret_key").exists()


def test_start_up_with_a_good_environment_passes_the_check(tmp_path):
    result = manage_check(tmp_path, DEBUG="false", SECRET_KEY="a-key-for-this-test")

    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout
