"""``manage.py serve``: the web server and a django-q2 cluster, stopped together."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django_q.tasks import async_task

from tests.peers.workers import ROOT, wait_for, worker_env

pytestmark = pytest.mark.django_db(transaction=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def group_members(group: int) -> list[int]:
    """The live (not zombie) processes whose process group is ``group``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after it.
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == group and state != "Z":
            members.append(int(entry.name))
    return members


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_serve_stops_its_busy_worker_at_a_second_signal_and_leaves_no_process(tmp_path):
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        serve = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--port", str(free_port())],
            cwd=ROOT,
            env=worker_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    cluster = None
    try:
        wait_for(lambda: "running." in log.read_text(), what="the cluster to start")
        text = log.read_text()
        cluster = int(text.split("django-q2 worker (pid ")[1].split(")")[0])
        assert group_members(cluster), "the cluster is not in a process group of its own"
        # A job that keeps a worker busy far beyond the grace period: asked to stop,
        # the cluster waits for it.
        async_task("time.sleep", 600, task_name="busy")
        wait_for(lambda: "processing" in log.read_text(), what="a worker to take the job")

        serve.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping" in log.read_text(), what="the cluster to begin stopping")
        time.sleep(0.5)
        assert alive(cluster), "the cluster stopped before the job ended: nothing tested"
        serve.send_signal(signal.SIGTERM)  # the second: stop it now

        assert serve.wait(timeout=10) == 0, log.read_text()
        wait_for(
            lambda: not alive(cluster) and not group_members(cluster),
            timeout=10,
            what="every process of the cluster to end",
        )
        text = log.read_text()
        assert "Stopping the worker" in text
        assert f"SIGTERM to this process (pid {serve.pid})" in text
        assert "Traceback" not in text
    finally:
        for group in (serve.pid, cluster):
            if group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
        serve.wait(timeout=10)
