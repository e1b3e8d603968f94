"""The runs list: pages, filters in the URL (task, status, model, days, text in the
input), the columns an operator scans, and every bad filter said, never a 500."""

from __future__ import annotations

import datetime
import re
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from tasks.models import Run, RunStatus
from tasks.services import run_start

pytestmark = pytest.mark.django_db


def rows(response) -> list[str]:
    page = response.content.decode()
    body = page[page.index('id="run-rows"') :]
    return [row for row in body.split("<tr>")[2:] if "<td" in row and 'class="empty"' not in row]


@pytest.fixture
def runs(make_task, operator):
    """Two tasks' runs: 60 of one, 5 of the other, with inputs, days and models apart."""
    alpha = make_task([{"content": "ok"}])
    beta = make_task([{"content": "ok"}])
    made = [
        run_start(task=alpha, run_input={"invoice": f"INV-{n:04d}"}, user=operator)
        for n in range(60)
    ]
    made += [run_start(task=beta, run_input={"lead": f"lead-{n}"}, user=operator) for n in range(5)]
    return {"alpha": alpha, "beta": beta, "runs": made}


def test_the_list_pages_through_every_run_newest_first(runs, operator_client):
    first = operator_client.get(reverse("runs:list"))
    assert len(rows(first)) == 50
    page = first.content.decode()
    assert "Runs 1 to 50 of 65" in page and "page 1 of 2" in page
    assert 'href="?page=2" rel="next"' in page
    second = operator_client.get(reverse("runs:list"), {"page": "2"})
    assert len(rows(second)) == 15 and "Runs 51 to 65 of 65" in second.content.decode()
    # The first run made is the oldest: last on the last page.
    assert "INV-0000" in rows(second)[-1]
    # A page past the end, or not a number, shows the nearest page there is.
    for page_asked, shown in (("99", 15), ("x", 50), ("-1", 15), ("9" * 40, 15)):
        response = operator_client.get(reverse("runs:list"), {"page": page_asked})
        assert response.status_code == 200 and len(rows(response)) == shown, page_asked


def test_the_filters_narrow_the_list_and_stay_in_its_links(runs, operator_client):
    beta = runs["beta"]
    response = operator_client.get(reverse("runs:list"), {"task": beta.slug})
    assert len(rows(response)) == 5
    page = response.content.decode()
    assert f'<option value="{beta.slug}" selected>' in page
    assert f'hx-get="/runs/?task={beta.slug}&amp;page=1"' in page

    text = operator_client.get(reverse("runs:list"), {"q": "inv-0042"})
    assert len(rows(text)) == 1 and "INV-0042" in rows(text)[0]

    model = operator_client.get(reverse("runs:list"), {"model": beta.model})
    assert len(rows(model)) == 5
    both = operator_client.get(reverse("runs:list"), {"model": beta.model, "q": "INV"})
    assert rows(both) == [] and "No run matches these filters" in both.content.decode()

    paged = operator_client.get(reverse("runs:list"), {"task": runs["alpha"].slug})
    assert f'href="?task={runs["alpha"].slug}&amp;page=2"' in paged.content.decode()


def test_the_days_filter_by_creation_in_the_server_s_time_zone(runs, operator_client):
    old = runs["runs"][0]
    last_week = timezone.now() - datetime.timedelta(days=7)
    Run.objects.filter(pk=old.pk).update(created_at=last_week)
    day = timezone.localtime(last_week).date()
    response = operator_client.get(
        reverse("runs:list"), {"since": day.isoformat(), "until": day.isoformat()}
    )
    assert len(rows(response)) == 1 and "INV-0000" in rows(response)[0]
    newer = operator_client.get(
        reverse("runs:list"), {"since": (day + datetime.timedelta(days=1)).isoformat()}
    )
    assert len(rows(newer)) == 50 and "Runs 1 to 50 of 64" in newer.content.decode()


def test_the_columns_show_input_duration_steps_and_spend(runs, operator_client):
    run = runs["runs"][-1]
    started = timezone.now() - datetime.timedelta(seconds=90)
    Run.objects.filter(pk=run.pk).update(
        status=RunStatus.SUCCEEDED,
        started_at=started,
        finished_at=started + datetime.timedelta(seconds=12.5),
        steps_used=7,
        spend=Decimal("0.012345"),
        input={"lead": "x" * 500},
    )
    row = rows(operator_client.get(reverse("runs:list")))[0]
    assert "12.5 s" in row and ">7<" in row and "0.0123" in row
    shown = re.search(r"<code>([^<]*)</code>", row).group(1)
    assert shown.startswith("{&quot;lead&quot;") and shown.endswith("…")
    assert len(shown.replace("&quot;", '"')) == 121  # 120 characters and the ellipsis


def test_a_hostile_input_is_shown_escaped(make_task, operator, operator_client):
    task = make_task([{"content": "ok"}])
    run_start(task=task, run_input={"x": "<script>alert(1)</script>"}, user=operator)
    page = operator_client.get(reverse("runs:list")).content.decode()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


@pytest.mark.parametrize(
    ("params", "said"),
    [
        ({"since": "yesterday"}, "since: &#x27;yesterday&#x27; is not a date (YYYY-MM-DD)"),
        ({"until": "2026-02-30"}, "until: &#x27;2026-02-30&#x27; is not a date"),
        ({"since": "0001-01-01"}, "since: 0001-01-01 is out of range"),
        ({"since": "2026-05-02", "until": "2026-05-01"}, "no day is in between"),
        ({"q": "a\x00b"}, "q: a NUL character cannot be stored or searched for"),
        ({"q": "x" * 201}, "q: longer than 200 characters (201)"),
        ({"task": "no-such-task"}, "No task is called &#x27;no-such-task&#x27;"),
        ({"task": "x\x00"}, "task: a NUL character"),
        ({"model": "m" * 201}, "model: longer than 200 characters"),
    ],
)
def test_a_filter_the_list_cannot_take_is_said_and_left_off(runs, operator_client, params, said):
    response = operator_client.get(reverse("runs:list"), params)
    assert response.status_code == 200
    page = response.content.decode()
    assert said in page and "all runs are shown" in page
    assert len(rows(response)) == 50


def test_a_page_of_the_list_is_a_fixed_number_of_queries(
    runs, operator_client, django_assert_num_queries
):
    operator_client.get(reverse("runs:list"))
    # session, user, the inbox count (+ 2 for permissions), the task filtered by, the
    # runs' count, the page of runs, the tasks for the choices
    with django_assert_num_queries(9):
        response = operator_client.get(
            reverse("runs:list"), {"task": runs["alpha"].slug, "q": "INV", "page": "2"}
        )
    assert len(rows(response)) == 10


def test_the_filters_push_a_clean_url_and_the_rows_refresh_pushes_none(runs, operator_client):
    beta = runs["beta"]
    form = operator_client.get(
        reverse("runs:list"),
        {"status": "", "task": beta.slug, "model": "", "q": ""},
        headers={"HX-Request": "true", "HX-Trigger": "run-filters"},
    )
    assert form["HX-Push-Url"] == f"/runs/?task={beta.slug}"
    refresh = operator_client.get(
        reverse("runs:list"),
        {"task": beta.slug, "page": "1"},
        headers={"HX-Request": "true", "HX-Trigger": "run-rows"},
    )
    assert "HX-Push-Url" not in refresh and len(rows(refresh)) == 5
