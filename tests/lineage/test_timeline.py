"""The lineage page as a timeline to step through: readable events with their dates,
the run's state as of the selected one, pages instead of the whole trail, the
verification checked again on request, and every bad request answered in words."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

import pytest
from django.contrib.auth.models import Permission
from django.db import transaction
from django.test import Client
from django.urls import reverse

from lineage.services import event_append, events_append
from lineage.views import PAGE_SIZE
from tasks.autonomy import task_trail_uuid
from tasks.governance import tool_trail_uuid
from tests.lineage.forgery import chain_write, run_param, tamper
from tests.lineage.test_state import demo_run

pytestmark = pytest.mark.django_db


def url(run_uuid: uuid.UUID, query: str = "") -> str:
    return reverse("runs:lineage:run", args=[run_uuid]) + (f"?{query}" if query else "")


def flat(response) -> str:
    """The page's text with its whitespace folded, so assertions read the markup."""
    return " ".join(response.content.decode().split())


def long_trail(length: int) -> uuid.UUID:
    """A trail of ``length`` events: a run queued, then model turns, one a step."""
    run_uuid = uuid.uuid4()
    with transaction.atomic():
        events_append(
            run_uuid=run_uuid,
            events=[
                ("run.queued", "user:olivia", {"objective": "count", "input": {}}),
                ("run.running", "engine", {"from": "queued"}),
                *[
                    (
                        "model.responded",
                        "engine",
                        {"step": n, "content": f"turn {n}", "tokens_in": 10, "tokens_out": 1},
                    )
                    for n in range(1, length - 1)
                ],
            ],
        )
    return run_uuid


@pytest.fixture
def demo(demo_task, operator, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    return demo_run(demo_task, operator)


def test_each_event_shows_its_kind_actor_date_with_offset_and_readable_payload(
    operator_client, demo, settings
):
    settings.TIME_ZONE = "Europe/Paris"
    text = flat(operator_client.get(url(demo.pk)))
    assert (
        '<code class="kind">approval.approved</code> <span class="actor">user:olivia</span>' in text
    )
    # The time in the server's zone with its offset, and in UTC to the microsecond.
    times = re.findall(r'<time datetime="([^"]+)" title="([^"]+) \(UTC\)">([^<]+)</time>', text)
    assert len(times) >= 24
    at_utc, title, local = times[0]
    assert at_utc == title and at_utc.endswith("+00:00")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+01:00", local)
    assert datetime.fromisoformat(local) == datetime.fromisoformat(at_utc).replace(
        microsecond=datetime.fromisoformat(at_utc).microsecond // 1000 * 1000
    )
    # A flat payload as keys and values; a long value folded under its beginning.
    assert '<dt>task</dt> <dd><span class="text">reconcile-invoices</span></dd>' in text
    assert "<dt>tokens_in</dt> <dd><code>400</code></dd>" in text
    assert "<details><summary>Batch 2026-11: 8 invoices, 8 payments, 3 mismatches." in text
    # The run's page and its task's, from the heading.
    assert f'of run <a href="{reverse("runs:detail", args=[demo.pk])}">' in text
    assert f'<a href="{reverse("tasks:detail", args=["reconcile-invoices"])}">' in text
    assert "lineage.css" in text and "lineage.js" in text


def test_a_tasks_trail_links_to_the_task_and_a_tools_to_the_tool(operator_client, demo_task):
    tool = demo_task.tools.first()
    for trail in (task_trail_uuid(demo_task), tool_trail_uuid(tool)):
        with transaction.atomic():
            event_append(run_uuid=trail, kind="config.changed", actor="user:olivia", payload={})
    text = flat(operator_client.get(url(task_trail_uuid(demo_task))))
    detail = reverse("tasks:detail", args=[demo_task.slug])
    assert f'of task <a href="{detail}">{demo_task.name}</a>' in text
    text = flat(operator_client.get(url(tool_trail_uuid(tool))))
    detail = reverse("tools:detail", args=[tool.name])
    assert f'of tool <a href="{detail}">{tool.name}</a>' in text


def test_stepping_shows_the_run_as_it_was_at_the_selected_event(operator_client, demo):
    events = list(demo_events(demo.pk))
    asked = events.index("approval.requested") + 1
    response = operator_client.get(url(demo.pk, f"at={asked}"))
    assert response.status_code == 200
    text = flat(response)
    assert f'<li id="e{asked}" class="event selected" aria-current="step">' in text
    assert f"<h2>As of event #{asked}</h2>" in text
    assert f'id="step-previous" href="{url(demo.pk, f"at={asked - 1}")}#e{asked - 1}"' in text
    assert f'id="step-next" href="{url(demo.pk, f"at={asked + 1}")}#e{asked + 1}"' in text
    state = text[text.index('id="state"') :]
    assert "version 2" in state and "Email finance the summary (needs approval)" in state
    approval = demo.approvals.get().pk
    assert f"<strong>#{approval}</strong> action: <code>email_send</code>" in state
    assert "<dt>Steps</dt><dd>8 of 20</dd>" in state

    # At the start: no plan yet, nothing to step back to; at the end: the approval closed.
    first = flat(operator_client.get(url(demo.pk, "at=1")))
    assert "No plan yet." in first and "← Previous</span>" in first
    end = flat(operator_client.get(url(demo.pk, f"at={len(events)}")))
    assert "version 3" in end and '<h3>Approvals open</h3> <p class="muted">None.</p>' in end
    assert "Next →</span>" in end

    # Without a selection: the state as the trail ends, and Next leads to the first event.
    default = flat(operator_client.get(url(demo.pk)))
    assert f"As the trail ends, at event #{len(events)}" in default
    assert f'id="step-next" href="{url(demo.pk, "at=1")}#e1"' in default


def demo_events(run_uuid: uuid.UUID):
    from lineage.models import LineageEvent

    return (
        LineageEvent.objects.filter(run_uuid=run_uuid)
        .order_by("seq")
        .values_list("kind", flat=True)
    )


def test_a_long_trail_is_paged_and_the_state_is_folded_to_the_selected_event(
    operator_client, django_assert_num_queries
):
    run_uuid = long_trail(520)
    text = flat(operator_client.get(url(run_uuid)))
    assert text.count('<li id="e') == PAGE_SIZE
    assert 'id="e1"' in text and 'id="e100"' in text and 'id="e101"' not in text
    assert "Page 1 of 6" in text
    assert f'href="{url(run_uuid, "page=2")}" rel="next">Later →' in text

    # Selecting event 450 shows its page; the state is as of it (448 model turns).
    with django_assert_num_queries(9):  # as for a trail of 6: see test_views
        response = operator_client.get(url(run_uuid, "at=450"))
    text = flat(response)
    assert "Page 5 of 6" in text and 'id="e401"' in text and 'id="e500"' in text
    assert 'id="e400"' not in text and 'id="e501"' not in text
    assert "<dt>Steps</dt><dd>448</dd>" in text
    assert "<dt>Tokens</dt><dd>4928 <span" in text
    assert "429 earlier entries" in text  # 20 of 449 entries shown
    assert f'href="{url(run_uuid, "page=4&amp;at=450")}" rel="prev">← Earlier' in text

    # Another page with the selection kept: the state is still that of event 450.
    text = flat(operator_client.get(url(run_uuid, "page=6&at=450")))
    assert 'id="e520"' in text and "<h2>As of event #450</h2>" in text


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("at=abc", "at: &#x27;abc&#x27; is not a whole number"),
        ("at=0", "at: &#x27;0&#x27; is not a whole number from 1"),
        ("at=-3", "is not a whole number"),
        ("at=1e3", "is not a whole number"),
        ("at=%EF%BC%91", "is not a whole number"),  # a full-width digit
        ("at=99999999999999999999999", "is not a whole number from 1 to 2147483647"),
        (
            "at=2147483647",
            "there is no event #2147483647: this trail&#x27;s events run from #1 to #6",
        ),
        ("at=7", "there is no event #7"),
        ("page=3", "there is no page 3: this trail has 1 page of 100 events"),
        ("page=0", "page: &#x27;0&#x27; is not a whole number"),
        ("at=1%00", "at: &#x27;1\\x00&#x27; is not a whole number"),
        ("at=%ED%A0%80", "is not a whole number"),
    ],
)
def test_a_bad_selection_is_a_400_that_says_why(operator_client, query, said):
    run_uuid = long_trail(6)
    response = operator_client.get(url(run_uuid, query))
    assert response.status_code == 400
    text = flat(response)
    assert "<strong>Not shown as asked:</strong>" in text and said in text
    assert "As the trail ends, at event #6" in text  # and the page is there


def test_an_event_missing_from_a_broken_trail_selects_the_one_before_it(operator_client):
    run_uuid = long_trail(8)
    tamper(
        "DELETE FROM lineage_lineageevent WHERE run_uuid = %s AND seq = 5", [run_param(run_uuid)]
    )
    text = flat(operator_client.get(url(run_uuid, "at=5")))
    assert "There is no event #5 in this trail" in text and "<h2>As of event #4</h2>" in text
    assert f'id="step-next" href="{url(run_uuid, "at=6")}#e6"' in text
    text = flat(operator_client.get(url(run_uuid, "at=6")))
    assert f'id="step-previous" href="{url(run_uuid, "at=4")}#e4"' in text
    assert '<li id="e6" class="event broken selected"' in text  # the verifier flagged it


def test_the_verification_is_checked_again_on_request(operator_client):
    run_uuid = long_trail(5)
    verify = reverse("runs:lineage:verify", args=[run_uuid])
    assert 'hx-post="' + verify + '" hx-target="#verification"' in flat(
        operator_client.get(url(run_uuid))
    )
    tamper(
        "UPDATE lineage_lineageevent SET canonical = 'garbage' WHERE run_uuid = %s AND seq = 2",
        [run_param(run_uuid)],
    )
    # With htmx: the panel alone, checked now.
    response = operator_client.post(verify, headers={"HX-Request": "true"})
    assert response.status_code == 200
    text = flat(response)
    assert text.startswith('<div id="verification"') and "<html" not in text
    assert "Not verified: 1 problem found." in text
    # Without JavaScript: back to the page, which shows the check.
    response = operator_client.post(verify)
    assert response.status_code == 303
    assert response["Location"] == url(run_uuid) + "#verification"
    assert operator_client.get(verify).status_code == 405
    assert (
        operator_client.post(reverse("runs:lineage:verify", args=[uuid.uuid4()])).status_code == 404
    )
    assert Client().post(verify).status_code == 302


def test_a_payload_cannot_inject_markup(operator_client):
    run_uuid = uuid.uuid4()
    attack = "<script>alert(1)</script>"
    with transaction.atomic():
        events_append(
            run_uuid=run_uuid,
            events=[
                ("run.queued", "user:<b>x</b>", {"objective": attack, attack: attack}),
                (
                    "model.responded",
                    "engine",
                    {
                        "content": attack,
                        "tool_calls": [
                            {"name": attack, "arguments": '{"a": "<img src=x onerror=alert(1)>"}'}
                        ],
                    },
                ),
                ("plan.drafted", "engine", {"steps": [{"title": attack, "status": attack}]}),
                (
                    "approval.requested",
                    "engine",
                    {"approval": 1, "tool": attack, "gate": attack, "arguments": {"x": attack}},
                ),
                ("tool.succeeded", "engine", {"tool": attack, "result": {"html": attack * 20}}),
            ],
        )
    for query in ("", "at=3"):
        text = operator_client.get(url(run_uuid, query)).content.decode()
        assert "<script>alert" not in text and "<img src=x" not in text and "<b>x</b>" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_the_time_is_given_in_full_for_trails_before_now(operator, operator_client, settings):
    operator.user_permissions.add(Permission.objects.get(codename="export_period"))
    settings.TIME_ZONE = "America/New_York"
    run_uuid = uuid.uuid4()
    at = datetime(2026, 7, 1, 3, 4, 5, 678901, tzinfo=UTC)
    chain_write(run_uuid, [{"at": at, "kind": "run.queued", "actor": "a", "payload": {}}])
    text = flat(operator_client.get(url(run_uuid)))
    assert (
        '<time datetime="2026-07-01T03:04:05.678901+00:00" title="2026-07-01T03:04:05.678901+00:00'
        ' (UTC)">2026-06-30T23:04:05.678-04:00</time>'
    ) in text
    # The period form offers the trail's days, in the server's zone.
    assert 'name="since" value="2026-06-30"' in text and 'name="until" value="2026-07-01"' in text
