"""manage.py bench_model_client, tiny: it prints the CPU a model call costs on both of
the client's paths, against a latency server it starts and stops itself."""

from __future__ import annotations

import re
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

FIGURE = re.compile(
    r"^(?P<path>blocking|awaited) \(.*\): (?P<cpu>[\d.]+) ms of CPU a call "
    r"\(wall (?P<wall>[\d.]+) ms\), (?P<calls>\d+) calls",
    re.MULTILINE,
)


def test_the_bench_prints_the_cpu_of_a_call_on_each_path_and_stops_its_server():
    output = StringIO()
    call_command("bench_model_client", "--calls", "3", "--warm-up", "1", stdout=output)
    text = output.getvalue()

    figures = {match["path"]: match for match in FIGURE.finditer(text)}
    assert set(figures) == {"blocking", "awaited"}, text
    for figure in figures.values():
        assert figure["calls"] == "3"
        assert 0 < float(figure["cpu"]) < 1000
        assert float(figure["wall"]) > 0
    assert text.startswith("load average before: ")
    # The server ran in a child process, which has ended and been reaped.
    pid = int(re.search(r"latency server: http://127\.0\.0\.1:\d+/v1, process (\d+)", text)[1])
    assert not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize(
    ("argument", "value", "problem"),
    [
        ("--calls", "0", "0 is not between 1 and 1000000"),
        ("--calls", "many", "'many' is not a whole number"),
        ("--warm-up", "-1", "-1 is not between 0 and 10000"),
    ],
)
def test_a_bad_count_is_refused_saying_which_and_why(argument, value, problem):
    with pytest.raises(CommandError, match=re.escape(problem)):
        call_command("bench_model_client", argument, value, stdout=StringIO())
