"""Trails to take away: one run's or one period's events as JSON Lines or CSV, from the
page and from ``manage.py export_lineage``; the JSON Lines file checks itself, and the
CSV opens in a spreadsheet without running anything."""

from __future__ import annotations

import csv
import io
import json
import uuid
import warnings
from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.db import transaction
from django.test import Client
from django.urls import reverse

from lineage.export_lines import lines_verify, main
from lineage.models import LineageEvent
from lineage.services import events_append
from tests.lineage.forgery import chain_write

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 11, 30, 22, 0, tzinfo=UTC)


def trail(length: int = 5, *, actor: str = "engine") -> uuid.UUID:
    run_uuid = uuid.uuid4()
    with transaction.atomic():
        events_append(
            run_uuid=run_uuid,
            events=[
                ("run.queued", "user:olivia", {"input": {"n": 1e20, "text": "nul\x00 \ud800"}}),
                *[("tool.succeeded", actor, {"step": n, "result": n}) for n in range(length - 1)],
            ],
        )
    return run_uuid


def dated_trail(start: datetime, hours: int) -> uuid.UUID:
    """A trail of one event an hour from ``start``."""
    run_uuid = uuid.uuid4()
    chain_write(
        run_uuid,
        [
            {"at": start + timedelta(hours=h), "kind": "note", "actor": "a", "payload": {"h": h}}
            for h in range(hours)
        ],
    )
    return run_uuid


def export(*args: str) -> str:
    out = StringIO()
    call_command("export_lineage", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def verify(text: str) -> list[str]:
    return lines_verify(text.splitlines()).problems


def test_a_runs_trail_exported_as_json_lines_verifies(tmp_path):
    run_uuid = trail(5)
    text = export("--run", str(run_uuid))
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["seq"] for line in lines] == [1, 2, 3, 4, 5]
    stored = LineageEvent.objects.get(run_uuid=run_uuid, seq=1)
    assert lines[0]["canonical"] == stored.canonical and lines[0]["hash"] == stored.hash
    assert lines[0]["payload"] == {"input": {"n": 1e20, "text": "nul\x00 \ud800"}}
    assert lines[0]["kind"] == "run.queued" and lines[0]["actor"] == "user:olivia"
    assert text.isascii()

    path = tmp_path / "trail.jsonl"
    path.write_text(text)
    out = StringIO()
    call_command("export_lineage", "--verify", str(path), stdout=out)
    assert out.getvalue().startswith("OK: 5 events of 1 trail: each line's text matches its hash")
    assert main([str(path)]) == 0


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        # The payload changed in the hashed text: the hash fails.
        (
            lambda lines: lines[2].update(canonical=lines[2]["canonical"].replace(":1,", ":7,")),
            "line 3 (event #3 of {run}): its text does not match its hash",
        ),
        # A column changed, the hashed text left: the columns disagree with it.
        (
            lambda lines: lines[1].update(kind="tool.failed"),
            "line 2 (event #2 of {run}): its kind column differ",
        ),
        (
            lambda lines: lines[1]["payload"].update(result=99),
            "line 2 (event #2 of {run}): its payload column differ",
        ),
        # A line removed, or two swapped.
        (lambda lines: lines.pop(2), "line 3 (event #4 of {run}): events #3 are missing"),
        (
            lambda lines: lines.insert(1, lines.pop(2)),
            "line 3 (event #2 of {run}): comes after event #3: lines are reordered",
        ),
        # A line whose link to the one before was changed (and its hash recomputed would
        # need the next line's link too: this one only moves prev_hash).
        (
            lambda lines: lines[3].update(prev_hash="f" * 64),
            "line 4 (event #4 of {run}): its text does not match its hash",
        ),
    ],
)
def test_an_edited_file_is_found_and_the_line_named(tmp_path, edit, said):
    run_uuid = trail(5)
    lines = [json.loads(line) for line in export("--run", str(run_uuid)).splitlines()]
    edit(lines)
    path = tmp_path / "edited.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    problems = lines_verify(path.read_text().splitlines()).problems
    assert any(p.startswith(said.format(run=run_uuid)) for p in problems), problems
    with pytest.raises(CommandError, match="is broken"):
        call_command("export_lineage", "--verify", str(path), stdout=StringIO(), stderr=StringIO())
    assert main([str(path)]) == 1


def test_a_file_that_is_not_lines_of_events_says_so():
    problems = verify('not json\n{"seq": 1}\n[1]\n\n')
    assert problems[0] == "line 1 is not JSON"
    assert problems[1].startswith("line 2 is not an event: it lacks run, at, kind")
    assert problems[2].startswith("line 3 is not an event")
    assert lines_verify([]).intact  # an empty period


def test_a_period_holds_every_trails_events_in_it_and_none_outside():
    early = dated_trail(T0, 3)  # 22:00, 23:00, 00:00 (UTC)
    late = dated_trail(T0 + timedelta(days=1), 2)
    text = export("--since", "2026-11-30T23:00:00+00:00", "--until", "2026-12-01T23:00:00Z")
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(line["run"], line["seq"]) for line in lines] == sorted(
        [(str(early), 2), (str(early), 3), (str(late), 1)]
    )
    report = lines_verify(text.splitlines())
    assert report.intact and report.starts[str(early)] == 2
    assert "start after their first event" in report.said()


def test_a_period_in_dates_is_read_in_the_servers_time_zone(settings):
    settings.TIME_ZONE = "Europe/Paris"  # midnight on 1 December is 23:00 UTC
    run_uuid = dated_trail(T0, 3)
    text = export("--since", "2026-12-01")
    assert [json.loads(line)["seq"] for line in text.splitlines()] == [2, 3]
    assert str(run_uuid) in text


def test_csv_is_safe_to_open_in_a_spreadsheet():
    run_uuid = uuid.uuid4()
    with transaction.atomic():
        events_append(
            run_uuid=run_uuid,
            events=[
                ("run.queued", '=HYPERLINK("http://x")', {"a": 1}),
                ("-2+3", "@SUM(A1)", {"b": "=1+1"}),
                ("+cmd", "\tx", {"c": 2}),
            ],
        )
    rows = list(csv.reader(io.StringIO(export("--run", str(run_uuid), "--format", "csv"))))
    header = ["run", "seq", "at", "kind", "actor", "payload", "prev_hash", "hash"]
    assert rows[0] == [*header, "hash_version", "canonical"]
    assert rows[1][4] == '\'=HYPERLINK("http://x")' and rows[1][3] == "run.queued"
    assert rows[2][3] == "'-2+3" and rows[2][4] == "'@SUM(A1)"
    assert rows[3][3] == "'+cmd" and rows[3][4] == "'\tx"
    assert rows[2][5] == '{"b":"=1+1"}'  # inside JSON, not at a cell's start
    stored = LineageEvent.objects.get(run_uuid=run_uuid, seq=2)
    assert rows[2][9] == stored.canonical and rows[2][7] == stored.hash
    for row in rows[1:]:
        assert not row[3].startswith(("=", "+", "-", "@", "\t", "\r"))


def test_the_command_refuses_what_it_cannot_do(tmp_path):
    for args, said in [
        ((), "say what to export"),
        (("--run", "nope"), "--run: 'nope' is not a UUID"),
        (("--run", str(uuid.uuid4()), "--since", "2026-01-01"), "not both"),
        (("--since", "yesterday"), "since: 'yesterday' is not an ISO 8601 date"),
        (("--since", "2026-02-30"), "is not an ISO 8601 date"),
        (("--since", "2026-12-02", "--until", "2026-12-01"), "until (2026-12-01"),
        (("--verify", str(tmp_path / "missing.jsonl")), "cannot be read"),
        (("--verify", "x", "--run", str(uuid.uuid4())), "give it alone"),
    ]:
        with pytest.raises(CommandError, match=said.replace("(", r"\(")):
            export(*args)
    path = tmp_path / "out.jsonl"
    path.write_text("")
    with pytest.raises(CommandError, match="File exists"):
        export("--run", str(uuid.uuid4()), "--output", str(path))


def test_the_command_writes_a_file_and_the_signed_export_still_works(tmp_path):
    run_uuid = trail(4)
    path = tmp_path / "trail.csv"
    err = StringIO()
    call_command(
        "export_lineage", "--run", str(run_uuid), "--format", "csv", "--output", str(path),
        stderr=err,
    )  # fmt: skip
    assert f"the trail of {run_uuid}: 4 events written to {path} (csv)" in err.getvalue()
    assert len(list(csv.reader(path.open(newline="")))) == 5
    signed = StringIO()
    call_command("lineage_export", str(run_uuid), stdout=signed)
    assert len(json.loads(signed.getvalue())["events"]) == 4


def test_the_page_streams_a_runs_trail_as_an_attachment(operator_client):
    run_uuid = trail(6)
    page = operator_client.get(reverse("runs:lineage:run", args=[run_uuid])).content.decode()
    export_url = reverse("runs:lineage:export", args=[run_uuid])
    assert f'href="{export_url}?format=jsonl" download' in page
    assert f'href="{export_url}?format=csv" download' in page

    response = operator_client.get(export_url, {"format": "jsonl"})
    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"] == "application/x-ndjson"
    assert response["Content-Disposition"] == f'attachment; filename="lineage-{run_uuid}.jsonl"'
    text = b"".join(response.streaming_content).decode()
    assert lines_verify(text.splitlines()).intact and len(text.splitlines()) == 6

    response = operator_client.get(export_url, {"format": "csv"})
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"] == f'attachment; filename="lineage-{run_uuid}.csv"'
    assert len(list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))) == 7


@pytest.fixture
def exporter_client(operator, operator_client):
    operator.user_permissions.add(Permission.objects.get(codename="export_period"))
    return operator_client


def test_a_period_is_exported_only_with_the_permission(operator_client, operator):
    """Reading one trail needs a login; every trail of a period at once is a bulk export,
    refused (and not offered on the page) without lineage.export_period."""
    run_uuid = dated_trail(T0, 3)
    period = reverse("runs:lineage:period_export", args=[run_uuid])
    asked = {"since": "2026-11-30", "until": "2026-12-02", "format": "jsonl"}
    assert operator_client.get(period, asked).status_code == 403
    page = operator_client.get(reverse("runs:lineage:run", args=[run_uuid]))
    assert "Export a period" not in page.content.decode()
    operator.user_permissions.add(Permission.objects.get(codename="export_period"))
    operator_client.force_login(User.objects.get(pk=operator.pk))
    assert operator_client.get(period, asked).status_code == 200
    page = operator_client.get(reverse("runs:lineage:run", args=[run_uuid]))
    assert "Export a period" in page.content.decode()


def test_the_page_exports_a_period(exporter_client):
    operator_client = exporter_client
    run_uuid = dated_trail(T0, 3)
    period = reverse("runs:lineage:period_export", args=[run_uuid])
    response = operator_client.get(
        period, {"since": "2026-11-30T23:00:00Z", "until": "2026-12-01", "format": "jsonl"}
    )
    assert response.status_code == 200
    assert (
        response["Content-Disposition"]
        == 'attachment; filename="lineage-20261130T230000Z-20261201T000000Z.jsonl"'
    )
    text = b"".join(response.streaming_content).decode()
    assert [json.loads(line)["seq"] for line in text.splitlines()] == [2]


@pytest.mark.parametrize(
    ("params", "said"),
    [
        ({"format": "xlsx"}, "format: &#x27;xlsx&#x27; is not one of jsonl, csv"),
        ({}, "give a period"),
        ({"since": "2026-12-01", "until": "2026-11-01"}, "must come after since"),
        ({"since": "soon"}, "since: 'soon' is not an ISO 8601 date"),
        ({"since": "2026-01-01\x00"}, "since: not a date or time"),
        ({"since": "9999-12-31T23:59:59-23:00"}, "is not an ISO 8601 date"),
        ({"since": "2026-01-01T10:00:00+99:00"}, "is not an ISO 8601 date"),
    ],
)
def test_the_page_refuses_a_bad_period_in_words(exporter_client, params, said):
    run_uuid = trail(2)
    response = exporter_client.get(
        reverse("runs:lineage:period_export", args=[run_uuid]), {"format": "jsonl", **params}
    )
    assert response.status_code == 400
    assert said.replace("&#x27;", "'") in response.content.decode()


def test_exports_need_a_login_and_an_unknown_trail_is_404(operator_client):
    run_uuid = trail(2)
    export_url = reverse("runs:lineage:export", args=[run_uuid])
    assert Client().get(export_url).status_code == 302
    assert Client().get(reverse("runs:lineage:period_export", args=[run_uuid])).status_code == 302
    assert (
        operator_client.get(reverse("runs:lineage:export", args=[uuid.uuid4()])).status_code == 404
    )
    assert operator_client.get(export_url, {"format": "x" * 5000}).status_code == 400


def test_under_asgi_the_export_is_streamed_not_read_whole_first(operator):
    from asgiref.sync import async_to_sync
    from django.test import AsyncClient

    run_uuid = trail(1200)  # more lines than one piece holds

    async def download() -> tuple[object, list[bytes]]:
        client = AsyncClient()
        await client.aforce_login(operator)
        response = await client.get(reverse("runs:lineage:export", args=[run_uuid]))
        return response, [piece async for piece in response.streaming_content]

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        response, pieces = async_to_sync(download)()
    assert response.status_code == 200 and response.is_async
    assert len(pieces) == 3  # 500, 500 and 200 lines, one piece at a time
    assert lines_verify(b"".join(pieces).decode().splitlines()).intact
    # Given a plain iterator, Django reads it whole first, and says so.
    assert not any("must consume synchronous iterators" in str(w.message) for w in warned)
