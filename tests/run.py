#!/usr/bin/env python
"""`make test`: the whole suite on SQLite (the embedded default), then again on
PostgreSQL (the scale-out database), browser tests once.

Locally a missing PostgreSQL skips its pass with the reason printed; in CI (CI=true) it
is a failure, as is any test that needs a missing service.
"""

from __future__ import annotations

import os
import subprocess
import sys

CI = os.environ.get("CI", "").lower() == "true"
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")


def postgres_problem() -> str:
    try:
        import psycopg

        psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
    except Exception as error:
        return f"PostgreSQL at {POSTGRES_URL} is not reachable ({error})"
    return ""


def pytest_pass(name: str, env: dict[str, str], args: list[str]) -> int:
    print(f"\n=== {name} ===", flush=True)
    command = [sys.executable, "-m", "pytest", *args, *sys.argv[1:]]
    return subprocess.call(command, env={**os.environ, **env})


def main() -> int:
    failed = []
    if pytest_pass("the suite on SQLite", {"DATABASE_URL": ""}, []) != 0:
        failed.append("SQLite")
    problem = postgres_problem()
    if problem and CI:
        print(f"\nFAILED: CI must run the PostgreSQL pass, but {problem}")
        failed.append("PostgreSQL (not reachable)")
    elif problem:
        print(f"\nSKIPPED the PostgreSQL pass: {problem}")
    elif (
        pytest_pass(
            "the suite on PostgreSQL", {"DATABASE_URL": POSTGRES_URL}, ["-m", "not browser"]
        )
        != 0
    ):
        failed.append("PostgreSQL")
    if failed:
        print(f"\nmake test: failed on {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
