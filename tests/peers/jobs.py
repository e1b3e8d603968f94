"""Jobs the tests hand to real queue workers, to see what a worker process holds."""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from django.db import connection

from agentops import background
from agentops.celery import app


def connection_identity() -> str:
    """Which database session this job ran on: the worker's pid and a mark kept in a
    temporary table, which lives exactly as long as the session (on either database)."""
    with connection.cursor() as cursor:
        cursor.execute("CREATE TEMP TABLE IF NOT EXISTS session_mark (mark VARCHAR(32))")
        cursor.execute("SELECT mark FROM session_mark")
        row = cursor.fetchone()
        if row is None:
            row = (uuid.uuid4().hex,)
            cursor.execute("INSERT INTO session_mark (mark) VALUES (%s)", row)
    return f"{os.getpid()}:{row[0]}"


# A thread that outlives the tasks, as the async worker's pool threads do.
POOL = ThreadPoolExecutor(max_workers=1)


@app.task(name="tests.connection_identity", ignore_result=True)
def connection_identity_task(path: str) -> None:
    """``connection_identity`` on a long-lived pool thread, the way the async worker's
    runs hand it what follows a commit (``background.soon``, which closes the thread's
    connection after the work if it is unusable or past its age), written as a line to
    ``path`` (Celery keeps no results). Celery itself closes the task's own thread's
    connections around every task, whatever ``CONN_MAX_AGE`` says (its Django fixup):
    the async worker's hand-over job does not use the database there."""
    token = background.offload.set(POOL.submit)
    try:
        background.soon(lambda: record(path))
    finally:
        background.offload.reset(token)


def record(path: str) -> None:
    with Path(path).open("a") as output:
        output.write(connection_identity() + "\n")
