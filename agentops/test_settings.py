"""Settings for the test suite: the real settings, read from the environment as in
production, with the two values a test run must not take from a deployment."""

import os
from pathlib import Path

os.environ.setdefault("SECRET_KEY", "insecure-key-for-the-test-suite-only")
os.environ.setdefault(
    "AGENTOPS_VAR_DIR", str(Path(__file__).resolve().parent.parent / "var" / "test")
)

from agentops.settings import *  # noqa: E402,F403
