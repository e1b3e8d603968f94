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


def get(url: str, **headers: str) -> tuple[int, str, str]:
    """GET ``url``: the status, the Content-Type and the body as text."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_serve_without_debug_serves_static_files_and_shows_no_environment_on_a_500(tmp_path):
    """What `make demo` runs: DEBUG off, the static files (the CSS, htmx) served by the
    app, and a server error answered without the settings or the environment."""
    import sqlite3

    marker = f"marker-{os.getpid()}-{time.monotonic_ns()}"
    database = tmp_path / "demo.sqlite3"
    env = {name: value for name, value in os.environ.items() if name != "DEBUG"}
    env.update(
        DJANGO_SETTINGS_MODULE="agentops.settings",
        AGENTOPS_ENV_FILE="",  # the checkout's .env is not this test's
        AGENTOPS_VAR_DIR=str(tmp_path / "var"),  # nothing collected: the finders serve
        DATABASE_URL=f"sqlite:///{database}",
        SECRET_KEY=f"key-{marker}",
        AGENTOPS_SERVE_TEST_MARKER=marker,
        PYTHONUNBUFFERED="1",
    )
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    # A server error on demand: every page that reads the session fails without its table.
    with sqlite3.connect(database) as db:
        db.execute("DROP TABLE django_session")

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        serve = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    cluster = None
    try:
        wait_for(lambda: "Uvicorn running on" in log.read_text(), what="the server to start")
        text = log.read_text()
        cluster = int(text.split("django-q2 worker (pid ")[1].split(")")[0])
        assert "DEBUG is on" not in text
        base = f"http://127.0.0.1:{port}"

        status, kind, css = get(f"{base}/static/agentops.css")
        assert (status, kind.split(";")[0]) == (200, "text/css") and css.strip()
        status, _, login = get(f"{base}/accounts/login/")
        assert status == 200
        htmx = login.split('<script src="')[1].split('"')[0]
        assert htmx.startswith("/static/django_htmx/htmx")
        status, kind, script = get(base + htmx)
        assert status == 200 and "javascript" in kind and "htmx" in script

        status, _, page = get(f"{base}/runs/", Cookie="sessionid=" + "a" * 32)
        assert status == 500
        assert "Server Error (500)" in page
        assert marker not in page and "SECRET_KEY" not in page and "Traceback" not in page
        assert "DATABASE_URL" not in page and "PATH" not in page
    finally:
        for group in (serve.pid, cluster):
            if group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGTERM)
        serve.wait(timeout=30)
        if cluster:
            wait_for(lambda: not group_members(cluster), timeout=30, what="the cluster to end")


def test_make_demo_env_turns_off_the_debug_it_wrote_and_keeps_a_persons_own(tmp_path):
    from agentops.demo_env import MARKER, demo_env
    from lineage.anchoring import key_decode

    ours = tmp_path / "ours.env"
    ours.write_text(f"{MARKER}: development settings for this checkout.\nDEBUG=true\n")
    assert demo_env(ours) == [
        "turned DEBUG off",
        "wrote a key for the trail's checkpoints",
        "wrote a SECRET_KEY",
    ]
    text = ours.read_text()
    assert "\nDEBUG=true" not in text and "# DEBUG=true was turned off by make demo" in text
    key = [line for line in text.splitlines() if line.startswith("SECRET_KEY=")]
    assert len(key) == 1 and len(key[0]) > 40
    [signing] = [line for line in text.splitlines() if line.startswith("AGENTOPS_LINEAGE_")]
    name, seed = signing.split("=", 1)
    assert name == "AGENTOPS_LINEAGE_SIGNING_KEY"
    assert len(key_decode(name, seed)) == 32  # a key lineage.anchoring signs with
    assert demo_env(ours) == [] and ours.read_text() == text  # a second run changes nothing

    theirs = tmp_path / "theirs.env"
    theirs.write_text("DEBUG=true\nSECRET_KEY=mine\n")
    assert demo_env(theirs) == [] and theirs.read_text() == "DEBUG=true\nSECRET_KEY=mine\n"

    fresh = tmp_path / "fresh.env"
    assert demo_env(fresh) == ["wrote a key for the trail's checkpoints", "wrote a SECRET_KEY"]
    assert fresh.read_text().startswith(MARKER) and "DEBUG" not in fresh.read_text()
