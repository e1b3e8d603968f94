"""Fixtures of the runtime's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agentops.runtime.engine.runner import Runner


@pytest.fixture
def runner(settings) -> Iterator[Runner]:
    settings.AGENTOPS_WORKER_CONCURRENCY = 50
    worker = Runner(50).start()
    yield worker
    assert worker.drain(10), "the runner's runs did not all finish"
