"""Settings for the test suite: the real settings, read from the environment as in
production, with the two values a test run must not take from a deployment."""

import os
from pathlib import Path

os.environ["AGENTOPS_ENV_FILE"] = ""  # a checkout's .env never reaches the tests
os.environ.setdefault("SECRET_KEY", "insecure-key-for-the-test-suite-only")
# One demo ledger per test run (worker processes inherit the variable).
os.environ.setdefault("AGENTOPS_DEMO_LEDGER", f"demo_ledger-{os.getpid()}.sqlite3")
os.environ.setdefault(
    "AGENTOPS_VAR_DIR", str(Path(__file__).resolve().parent.parent / "var" / "test")
)

from agentops.settings import *  # noqa: F403

# One test database per test process, so two runs of the suite never meet. On SQLite
# it is a file, so that worker processes started by the tests see the test's data.
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):  # noqa: F405
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / f"test-{os.getpid()}.sqlite3")}  # noqa: F405
else:
    DATABASES["default"]["TEST"] = {"NAME": f"test_agentops_{os.getpid()}"}  # noqa: F405

# The SQL tools' tests use the suite's own database, through the "default" alias, as their
# PostgreSQL and SQLite peer; production refuses that (tests/runtime/tools/test_sql.py).
AGENTOPS_SQL_OWN_DATABASE = True

# The secrets and MCP server commands the suite's tools use, listed as a deployment lists
# its own (tests/runtime/tools/test_boundary.py shows that nothing else is reachable).
AGENTOPS_TOOL_SECRETS = [
    *("TEST_API_TOKEN", "HTTP_TEST_TOKEN", "HTTP_TEST_MISSING", "MCP_TEST_TOKEN"),
    *("MCP_ABSENT_TOKEN", "SQLTOOL_LEDGER_PATH", "SQLTOOL_PASSWORD", "SQLTOOL_DATABASE"),
    *("SQLTOOL_URL", "LEDGER_PASSWORD", "LEDGER_URL", "API_TOKEN", "TOKEN", "K"),
]
AGENTOPS_MCP_COMMANDS = [["python", "-m", "mcp_server_time"]]

# Hashing test passwords at full strength would cost most of the suite's time.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# The suite's own tools and scripted models (tests/agent_tools.py) are discovered like
# any app's, so worker processes started by the tests know them too.
INSTALLED_APPS = [*INSTALLED_APPS, "tests"]  # noqa: F405

# The tests drive the engine inline unless they say otherwise: a queue job run in the test
# process returns what the slice did. The async worker's tests set it themselves, and
# pass it to the worker processes they start.
AGENTOPS_WORKER_CONCURRENCY = int(os.environ.get("AGENTOPS_WORKER_CONCURRENCY", "0"))
# A browser test's event streams end soon after it does (the browser reconnects).
AGENTOPS_LIVE_STREAM_SECONDS = 10.0
