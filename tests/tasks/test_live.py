"""The run page, live (tasks.live, tasks.views_live): the stream and the polling fallback
send only what the page lacks, so nothing an operator types or opens is replaced."""

from __future__ import annotations

import re

import pytest
from django.test import AsyncClient, Client
from django.urls import reverse

from approvals.models import Approval
from approvals.services import approval_decide
from tasks.live import Cursor, CursorInvalid
from tasks.models import Run, RunStatus, Step, StepKind, StepStatus
from tasks.services import run_start
from tests.conftest import PLANNED, run_coroutine, run_until_rest

pytestmark = pytest.mark.django_db


def page_cursor(page: str) -> str:
    found = re.search(r'data-cursor="([^"]*)"', page)
    assert found, "the page follows the run"
    return found.group(1)


@pytest.fixture
def waiting_run(demo_task, operator_client) -> Run:
    """The demo's run, held at its email for a person's approval."""
    operator_client.post(
        reverse("tasks:run", args=[demo_task.slug]), {"input": '{"batch": "2026-11"}'}
    )
    run = Run.objects.get()
    run_until_rest(run)
    assert run.status == RunStatus.WAITING
    return run


def changes(client, run: Run, cursor: str):
    return client.get(reverse("runs:changes", args=[run.pk]), {"cursor": cursor})


def test_a_live_run_page_follows_the_run_from_its_cursor(waiting_run, operator_client):
    page = operator_client.get(reverse("runs:detail", args=[waiting_run.pk])).content.decode()
    cursor = Cursor.parse(page_cursor(page))
    email = waiting_run.steps.get(tool_name="email_send")
    assert 'sse-connect="/runs/' in page and 'sse-close="end"' in page
    assert cursor.live and cursor.last_step == email.number
    # The held email may still change (its approval waits): the page tracks it.
    assert list(cursor.open_steps) == [email.number]
    assert cursor.waiting == (Approval.objects.get().pk,)
    # Its notice leads to the very item in the inbox.
    assert f"/approvals/?item={Approval.objects.get().pk}" in page
    # And the item can be decided right here, coming back to this page.
    decide = reverse("approvals:decide", args=[Approval.objects.get().pk])
    assert f'action="{decide}"' in page
    assert f'name="next" value="/runs/{waiting_run.pk}/"' in page


def test_nothing_recorded_means_nothing_sent(waiting_run, operator_client):
    page = operator_client.get(reverse("runs:detail", args=[waiting_run.pk])).content.decode()
    cursor = page_cursor(page)
    response = changes(operator_client, waiting_run, cursor)
    assert response.status_code == 200 and response.content == b""
    assert response["X-Live-Cursor"] == cursor and response["X-Live-Finished"] == "false"


def test_after_a_decision_only_new_steps_changed_steps_and_the_summary_are_sent(
    waiting_run, operator, operator_client
):
    page = operator_client.get(reverse("runs:detail", args=[waiting_run.pk])).content.decode()
    cursor = page_cursor(page)
    email = waiting_run.steps.get(tool_name="email_send")
    approval_decide(approval=Approval.objects.get(), user=operator, approve=True)
    run_until_rest(waiting_run)
    assert waiting_run.status == RunStatus.SUCCEEDED

    response = changes(operator_client, waiting_run, cursor)
    html = response.content.decode()
    later = list(waiting_run.steps.filter(number__gt=email.number).order_by("number"))
    assert later, "the run recorded steps after the approval"
    # The email's step is replaced on its own; the later ones are appended.
    assert f'id="step-{email.number}" hx-swap-oob="outerHTML"' in html
    assert '<ol id="timeline" hx-swap-oob="beforeend">' in html
    for step in later:
        assert f'id="step-{step.number}"' in html
        assert f'id="step-{step.number}" hx-swap-oob' not in html
    # No step shown before and unchanged comes again.
    assert 'id="step-1"' not in html
    # The summary is swapped; the cancel form goes, as the run is over.
    assert '<div id="run-summary" hx-swap-oob="outerHTML">' in html and "succeeded" in html
    assert '<div id="run-cancel" hx-swap-oob="outerHTML">' in html
    assert 'name="why"' not in html
    assert response["X-Live-Finished"] == "true"

    # From the new cursor there is nothing more to send.
    again = changes(operator_client, waiting_run, response["X-Live-Cursor"])
    assert again.content == b"" and again["X-Live-Finished"] == "true"


def test_the_cancel_form_is_not_sent_again_while_the_run_stays_live(make_task, operator_client):
    task = make_task([PLANNED, {"content": "all done"}])
    operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    run = Run.objects.get()
    page = operator_client.get(reverse("runs:detail", args=[run.pk])).content.decode()
    assert 'name="why"' in page and "No steps yet" in page
    cursor = page_cursor(page)
    # A step recorded while the run stays live: the summary and the step come, the
    # cancel box (where a reason may be half typed) does not.
    Step.objects.create(run=run, number=1, kind=StepKind.MODEL, status=StepStatus.SUCCEEDED)
    from lineage.services import event_append

    event_append(run_uuid=run.pk, kind="test.step", actor="test", payload={})
    html = changes(operator_client, run, cursor).content.decode()
    assert 'id="step-1"' in html and 'id="timeline-empty" hx-swap-oob="delete"' in html
    assert "run-cancel" not in html and 'name="why"' not in html


def test_a_finished_run_page_does_not_follow(make_task, operator_client):
    task = make_task([PLANNED, {"content": "all done"}])
    operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    run = Run.objects.get()
    run_until_rest(run)
    page = operator_client.get(reverse("runs:detail", args=[run.pk])).content.decode()
    assert "sse-connect" not in page and "all done" in page


def test_the_stream_sends_events_and_ends_when_the_run_is_over(
    waiting_run, operator, operator_client, settings
):
    settings.AGENTOPS_LIVE_STREAM_SECONDS = 5
    page = operator_client.get(reverse("runs:detail", args=[waiting_run.pk])).content.decode()
    cursor = page_cursor(page)
    approval_decide(approval=Approval.objects.get(), user=operator, approve=True)
    run_until_rest(waiting_run)
    response = operator_client.get(reverse("runs:live", args=[waiting_run.pk]), {"cursor": cursor})
    assert response["Content-Type"] == "text/event-stream"
    body = b"".join(response.streaming_content).decode()
    events = [block for block in body.split("\n\n") if block.strip()]
    assert events[0] == "retry: 2000"
    changed, end = events[1], events[2]
    assert changed.startswith("event: changes\nid: ")
    # Every line of the HTML is a data field of its own: none can end the event early.
    assert all(line.startswith(("event:", "id:", "data:")) for line in changed.split("\n"))
    assert "run-summary" in changed
    assert end == "event: end\ndata: finished"
    # A reconnect sends its last event id: from there, nothing is missing.
    event_id = changed.split("\n")[1].removeprefix("id: ")
    again = operator_client.get(
        reverse("runs:live", args=[waiting_run.pk]), headers={"Last-Event-ID": event_id}
    )
    rest = b"".join(again.streaming_content).decode()
    assert "event: changes" not in rest and "event: end" in rest


def test_a_step_s_text_cannot_forge_an_event_or_script(make_task, operator_client):
    hostile = "fine\n\nevent: end\ndata: x\r\n<script>alert(1)</script>"
    task = make_task([PLANNED, {"content": hostile}])
    operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    run = Run.objects.get()
    page = operator_client.get(reverse("runs:detail", args=[run.pk])).content.decode()
    cursor = page_cursor(page)
    run_until_rest(run)
    html = changes(operator_client, run, cursor).content.decode()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    body = b"".join(
        operator_client.get(
            reverse("runs:live", args=[run.pk]), {"cursor": cursor}
        ).streaming_content
    ).decode()
    # The model's blank line and "event: end" arrive as data lines, not as an event.
    assert body.count("\nevent: end") + body.startswith("event: end") == 1
    assert re.search(r"^data: .*event: end", body, re.MULTILINE)
    # And every line of the stream is a field the stream wrote.
    fields = ("retry:", "event:", "id:", "data:")
    assert all(line.startswith(fields) for line in body.split("\n") if line)


@pytest.mark.parametrize(
    "cursor",
    ["", "nonsense", "1.2.3", "1.2.2..", "-1.0.1..", "1.0.1..1:zzzzzzzz", "9" * 40 + ".0.1.."],
)
def test_a_cursor_the_page_did_not_write_is_refused_with_a_400(
    waiting_run, operator_client, cursor
):
    response = changes(operator_client, waiting_run, cursor)
    assert response.status_code == 400 and b"cursor" in response.content
    with pytest.raises(CursorInvalid):
        Cursor.parse(cursor)


def test_the_live_pages_need_a_login_and_a_real_run(operator_client):
    assert Client().get(reverse("runs:trail_live")).status_code == 302
    missing = reverse("runs:changes", args=["00000000-0000-0000-0000-000000000000"])
    assert operator_client.get(missing, {"cursor": "0.0.1.."}).status_code == 404


def test_the_lists_hear_when_anything_is_recorded(waiting_run, operator, operator_client, settings):
    settings.AGENTOPS_LIVE_STREAM_SECONDS = 3
    from tasks import views_live

    before = views_live.trail_last_id()
    approval_decide(approval=Approval.objects.get(), user=operator, approve=True)
    assert views_live.trail_last_id() > before
    # The stream starts from the trail as it is now: a quiet trail sends no event.
    body = b"".join(operator_client.get(reverse("runs:trail_live")).streaming_content)
    assert body.decode() == "retry: 2000\n\n"


def test_a_long_run_is_paged_not_sent_whole(make_task, operator_client):
    task = make_task([PLANNED, {"content": "all done"}])
    operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    run = Run.objects.get()
    Step.objects.bulk_create(
        Step(
            run=run, number=n, kind=StepKind.MODEL, status=StepStatus.SUCCEEDED, content=f"turn {n}"
        )
        for n in range(1, 131)
    )
    page = operator_client.get(reverse("runs:detail", args=[run.pk])).content.decode()
    shown = [int(n) for n in re.findall(r'id="step-(\d+)"', page)]
    assert shown == list(range(31, 131))
    assert "?before=31" in page
    earlier = operator_client.get(reverse("runs:detail", args=[run.pk]), {"before": 31})
    shown = [int(n) for n in re.findall(r'id="step-(\d+)"', earlier.content.decode())]
    assert shown == list(range(1, 31))
    assert "sse-connect" not in earlier.content.decode()  # a past page stands still
    for bad in ("x", "0", "-3", "9" * 30):
        response = operator_client.get(reverse("runs:detail", args=[run.pk]), {"before": bad})
        assert response.status_code == 400 and b"before" in response.content


def test_the_call_in_flight_shows_as_such(make_task, operator_client):
    task = make_task([PLANNED, {"content": "all done"}])
    operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    run = Run.objects.get()
    Run.objects.filter(pk=run.pk).update(status=RunStatus.RUNNING)
    page = operator_client.get(reverse("runs:detail", args=[run.pk])).content.decode()
    assert "Waiting for the model" in page and "data-since" in page
    Step.objects.create(
        run=run, number=1, kind=StepKind.TOOL, status=StepStatus.STARTED, tool_name="ledger_read"
    )
    page = operator_client.get(reverse("runs:detail", args=[run.pk])).content.decode()
    assert "Calling the tool <strong>ledger_read</strong>" in page


def test_the_run_page_is_a_fixed_number_of_queries(
    waiting_run, operator_client, django_assert_num_queries
):
    operator_client.get(reverse("runs:detail", args=[waiting_run.pk]))
    # session, user, the run (with its firing and pending count), the trail's head,
    # the steps, their approvals, pending ids, permissions (2), the cards to decide in
    # place, the nav count, the groups a card can hand its item to
    with django_assert_num_queries(12):
        operator_client.get(reverse("runs:detail", args=[waiting_run.pk]))


@pytest.mark.django_db(transaction=True)
def test_under_asgi_the_stream_is_asynchronous_and_ends_with_the_run(make_task, operator, settings):
    """As ``manage.py serve`` (uvicorn) serves it: an async generator, no thread held."""
    settings.AGENTOPS_LIVE_STREAM_SECONDS = 5
    task = make_task([PLANNED, {"content": "all done"}])
    client = Client()
    client.force_login(operator)
    client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    run = Run.objects.get()
    cursor = page_cursor(client.get(reverse("runs:detail", args=[run.pk])).content.decode())
    run_until_rest(run)

    async def stream() -> tuple[bool, str]:
        asgi = AsyncClient()
        await asgi.aforce_login(operator)
        response = await asgi.get(reverse("runs:live", args=[run.pk]), {"cursor": cursor})
        assert response.is_async
        parts = [part async for part in response.streaming_content]
        return response.is_async, b"".join(parts).decode()

    is_async, body = run_coroutine(stream())
    assert is_async and "event: changes" in body and "all done" in body
    assert body.endswith("event: end\ndata: finished\n\n")


def test_a_cursor_far_behind_gets_the_latest_steps_not_the_whole_run(make_task, operator_client):
    """A page (or a forged cursor) far behind a long run is sent the latest 100 steps
    as the new timeline, as a reload would show it: never every step of the run."""
    task = make_task([PLANNED, {"content": "all done"}])
    operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    run = Run.objects.get()
    Step.objects.bulk_create(
        Step(run=run, number=n, kind=StepKind.MODEL, status=StepStatus.SUCCEEDED)
        for n in range(1, 1001)
    )
    from lineage.services import event_append

    event_append(run_uuid=run.pk, kind="test.steps", actor="test", payload={})
    html = changes(operator_client, run, "0.0.1..").content.decode()
    shown = [int(n) for n in re.findall(r'id="step-(\d+)"', html)]
    assert shown == list(range(901, 1001))
    assert '<ol class="timeline" id="timeline" hx-swap-oob="outerHTML">' in html
    assert "?before=901" in html


def test_a_run_cancelled_while_waiting_is_not_followed_for_ever(
    waiting_run, operator, operator_client
):
    from tasks.services import run_cancel

    page = operator_client.get(reverse("runs:detail", args=[waiting_run.pk])).content.decode()
    cursor = page_cursor(page)
    run_cancel(run=waiting_run, user=operator, why="not today")
    response = changes(operator_client, waiting_run, cursor)
    assert response["X-Live-Finished"] == "true"
    assert "cancelled" in response.content.decode()
    # Its held email stays proposed, but nothing on it can change now: no stream.
    page = operator_client.get(reverse("runs:detail", args=[waiting_run.pk])).content.decode()
    assert "sse-connect" not in page


def test_an_input_with_an_items_key_is_shown_not_a_500(make_task, operator, operator_client):
    task = make_task([PLANNED, {"content": "all done"}])
    run = run_start(task=task, run_input={"items": [1, 2, 3], "other": "x"}, user=operator)
    response = operator_client.get(reverse("runs:detail", args=[run.pk]))
    assert response.status_code == 200
    assert "<dt>items</dt>" in response.content.decode()


def test_one_person_cannot_hold_more_streams_than_the_cap(waiting_run, operator_client, settings):
    settings.AGENTOPS_LIVE_STREAMS_PER_USER = 2
    settings.AGENTOPS_LIVE_STREAM_SECONDS = 1
    url = reverse("runs:trail_live")
    first, second = operator_client.get(url), operator_client.get(url)
    third = operator_client.get(url)
    assert (first.status_code, second.status_code) == (200, 200)
    assert third.status_code == 503 and third["Retry-After"] == "30"
    # A stream that ended gives its place back.
    assert b"".join(first.streaming_content).startswith(b"retry:")
    fourth = operator_client.get(url)
    assert fourth.status_code == 200
    for response in (second, fourth):
        b"".join(response.streaming_content)
