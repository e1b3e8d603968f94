"""The operator's pages for triggers, through real HTTP: the task page's Triggers
section (what each trigger listens to, its rails, its last firings), the run page's
"Started by", the runs list's filters. No credential ever reaches a page."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.urls import reverse
from django.utils import timezone

from tasks.models import Run, Trigger
from tests.conftest import PLANNED
from triggers.models import Firing
from triggers.selectors import FIRINGS_SHOWN, secret_fingerprint, url_redacted
from triggers.services import secret_new, trigger_fire

pytestmark = pytest.mark.django_db

Kind = Trigger.Kind
NOW = datetime(2026, 3, 27, 12, 0, tzinfo=UTC)


def page_of(client, task) -> str:
    response = client.get(reverse("tasks:detail", args=[task.slug]))
    assert response.status_code == 200
    return response.content.decode()


def section(page: str, anchor: str) -> str:
    """The HTML of the trigger whose article has the id ``anchor``."""
    start = page.index(f'id="{anchor}"')
    return page[start : page.index("</article>", start)]


# The task page -----------------------------------------------------------------------


def test_the_demo_task_page_shows_its_schedule_and_webhook(demo_task, operator_client):
    with time_machine.travel(NOW, tick=False):
        page = page_of(operator_client, demo_task)
    nightly = Trigger.objects.get(task=demo_task, kind=Kind.CRON)
    webhook = Trigger.objects.get(task=demo_task, kind=Kind.WEBHOOK)

    cron = section(page, f"trigger-{nightly.pk}")
    assert "Reconcile every night" in cron and "Schedule (cron)" in cron and "enabled" in cron
    assert "0 2 * * * (UTC)" in cron
    # The next five slots, in the schedule's zone, from the (frozen) clock.
    for day in ("Sat 2026-03-28", "Sun 2026-03-29", "Mon 2026-03-30", "Tue 2026-03-31"):
        assert f"{day} 02:00 UTC" in cron
    assert "Wed 2026-04-01 02:00 UTC" in cron and "2026-04-02" not in cron
    assert "{batch: batch}" in cron  # the mapping

    hook = section(page, f"trigger-{webhook.pk}")
    assert "http://testserver/hooks/demo-batch-closed/" in hook
    assert f"fingerprint {secret_fingerprint(webhook.secret)}" in hook
    assert "300 s" in hook and "at most 10 runs a minute, 100 an hour" in hook
    assert webhook.secret not in page and webhook.secret.removeprefix("whsec_") not in page
    # The task's cap on live runs, with the rails' rule.
    assert "Live runs at once: at most 3" in page


def test_a_trigger_with_a_different_time_zone_shows_its_slots_in_that_zone(
    make_trigger, operator_client
):
    trigger = make_trigger(
        Kind.CRON, config={"expression": "30 8 * * 1-5", "timezone": "Europe/Paris"}
    )
    with time_machine.travel(NOW, tick=False):  # a Friday; Paris changes to CEST on Sunday
        page = page_of(operator_client, trigger.task)
    assert "30 8 * * 1-5 (Europe/Paris)" in page
    assert "Fri 2026-03-27" not in page  # 08:30 Paris is past by noon UTC
    assert "Mon 2026-03-30 08:30 CEST" in page and "Fri 2026-04-03 08:30 CEST" in page


def test_a_queue_url_is_shown_without_its_password(make_trigger, operator_client):
    trigger = make_trigger(
        Kind.QUEUE,
        config={
            "transport": "amqp",
            "url": "amqp://agentops:hunter2-broker-pw@rabbit.internal:5672/prod",
            "queue": "invoices",
        },
    )
    page = page_of(operator_client, trigger.task)
    assert "hunter2-broker-pw" not in page
    assert "amqp://agentops:•••@rabbit.internal:5672/prod" in page
    assert "invoices" in page and "invoices.dead" in page  # the dead letters' default


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw-123@h:6379/0", "redis://:•••@h:6379/0"),
        ("redis://h:6379/0?password=pw-123&db=2", "redis://h:6379/0?password=•••&db=2"),
        ("amqp://u:{secret:TRIGGER_SECRET_MQ}@h//", "amqp://u:{secret:TRIGGER_SECRET_MQ}@h//"),
        ("amqps://u@h/vhost?auth_token=pw-123", "amqps://u@h/vhost?auth_token=•••"),
        ("redis://h:6379", "redis://h:6379"),
        ("redis://[::1:6379", "•••"),  # does not parse: nothing of it is shown
    ],
)
def test_a_url_is_redacted_of_every_credential(url, shown):
    assert url_redacted(url) == shown
    assert "pw-123" not in url_redacted(url)


def test_an_email_trigger_shows_its_address_and_senders(make_trigger, operator_client):
    trigger = make_trigger(
        Kind.EMAIL,
        config={"address": "invoices@in.example", "senders": ["ap@example.com", "@erp.example"]},
    )
    page = page_of(operator_client, trigger.task)
    assert "invoices@in.example" in page and "ap@example.com, @erp.example" in page
    assert "not checked" in page  # DKIM


def test_each_trigger_shows_its_last_firings_accepted_with_the_run_refused_with_why(
    make_trigger, operator_client
):
    trigger = make_trigger(max_per_minute=2)
    base = timezone.now() - timedelta(hours=1)
    for number in range(FIRINGS_SHOWN + 4):
        trigger_fire(
            trigger_id=trigger.pk,
            key=f"evt_{number:02}",
            payload={"n": number},
            now=base + timedelta(minutes=number),
        )
    # Two a minute: each minute's first two are accepted, the rest refused; here one a
    # minute, so add a burst in the last minute.
    for number in range(3):
        trigger_fire(trigger_id=trigger.pk, key=f"burst_{number}", payload={})
    refused = Firing.objects.get(key="burst_2")
    assert refused.refusal == Firing.Refusal.RATE

    card = section(page_of(operator_client, trigger.task), f"trigger-{trigger.pk}")
    assert card.count("<tr><td") == FIRINGS_SHOWN
    assert "burst_2" in card and "Over the trigger&#x27;s rate limit" in card
    assert "rate limit: the trigger started 2 runs in the last minute" in card
    run = Firing.objects.get(key="burst_0").run
    assert reverse("runs:detail", args=[run.pk]) in card
    assert "evt_07" in card and "evt_06" not in card  # past the last 20
    assert "26 accepted, 1 refused" in card
    assert f"?trigger={trigger.pk}" in card  # its runs


def test_the_task_page_is_a_fixed_number_of_queries_however_many_triggers_and_firings(
    make_trigger, operator_client, django_assert_max_num_queries
):
    one = make_trigger()
    task = one.task
    trigger_fire(trigger_id=one.pk, key="a", payload={})
    with django_assert_max_num_queries(30) as few:
        page_of(operator_client, task)
    for kind, config in (
        (Kind.CRON, {"expression": "*/5 * * * *"}),
        (Kind.WEBHOOK, {}),
        (Kind.EMAIL, {"address": "in@example.com", "senders": ["@example.com"]}),
    ):
        trigger = make_trigger(kind, task=task, name=f"more {kind}", config=config)
        for number in range(25):
            trigger_fire(trigger_id=trigger.pk, key=f"k{number}", payload={"n": number})
    with django_assert_max_num_queries(len(few.captured_queries)):
        page = page_of(operator_client, task)
    assert page.count('<article class="trigger"') == 4


def test_a_person_without_trigger_permissions_sees_triggers_but_no_way_to_edit_them(
    demo_task, client, outsider, admin_user
):
    client.force_login(outsider)
    page = page_of(client, demo_task)
    assert "Reconcile every night" in page and "/hooks/demo-batch-closed/" in page
    assert "Add a trigger" not in page and "/admin/tasks/trigger/" not in page

    client.force_login(admin_user)
    page = page_of(client, demo_task)
    assert "Add a trigger" in page
    assert f"/admin/tasks/trigger/add/?task={demo_task.pk}" in page


def test_a_task_without_triggers_says_only_a_person_starts_it(make_task, operator_client):
    page = page_of(operator_client, make_task([]))
    assert "No triggers: only a person starts this task" in page
    assert "Live runs at once: no cap" in page


def test_a_schedule_saved_past_the_checks_shows_no_slots_rather_than_failing(
    make_trigger, operator_client
):
    trigger = make_trigger(Kind.CRON, config={"expression": "0 0 31 2 *"})  # never comes
    page = page_of(operator_client, trigger.task)
    assert "0 0 31 2 * (UTC)" in page and 'class="next-slots"' not in page


# The run page ------------------------------------------------------------------------


def webhook_run(make_trigger, payload, **fields) -> tuple[Trigger, Run]:
    trigger = make_trigger(name="Invoice created", **fields)
    fired = trigger_fire(trigger_id=trigger.pk, key="msg_2b7Kq", payload=payload)
    assert fired.accepted, fired.firing.reason
    return trigger, fired.run


def test_a_run_a_trigger_started_names_it_its_key_and_what_arrived(make_trigger, operator_client):
    payload = {
        "type": "invoice.created",
        "data": {"invoice": "INV-7", "note": "<script>x</script>"},
    }
    trigger, run = webhook_run(make_trigger, payload, input_mapping="data")
    page = operator_client.get(reverse("runs:detail", args=[run.pk])).content.decode()
    started = page[page.index('id="started-by"') :][:800]
    assert "the trigger" in started and "Invoice created" in started and "Webhook" in started
    assert reverse("tasks:detail", args=[trigger.task.slug]) + f"#trigger-{trigger.pk}" in started
    assert "<code>msg_2b7Kq</code>" in page
    details = page[page.index('<details class="payload">') :]
    assert "&quot;invoice.created&quot;" in details  # in the collapsed block
    assert "<script>x</script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page


def test_what_arrived_is_cut_on_the_page_when_large(make_trigger, operator_client):
    payload = {"id": 7, "lines": [f"line {number} " + "x" * 80 for number in range(200)]}
    _, run = webhook_run(make_trigger, payload, input_mapping="{id: id}")
    page = operator_client.get(reverse("runs:detail", args=[run.pk])).content.decode()
    assert "the first 8000 shown" in page
    assert "line 10 " in page and "line 199 " not in page


def test_a_run_a_person_started_names_the_person(make_task, operator_client):
    task = make_task([PLANNED, {"content": "ok"}])
    operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    page = operator_client.get(reverse("runs:detail", args=[Run.objects.get().pk])).content
    started = page.decode()[page.decode().index('id="started-by"') :][:200]
    assert "olivia (manual)" in started and "Firing key" not in page.decode()


def test_the_run_page_of_a_triggered_run_takes_no_more_queries_than_a_persons(
    make_trigger, make_task, operator_client, django_assert_max_num_queries
):
    task = make_task([PLANNED, {"content": "ok"}])
    operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    manual = Run.objects.get()
    with django_assert_max_num_queries(30) as person:
        operator_client.get(reverse("runs:detail", args=[manual.pk]))
    _, run = webhook_run(make_trigger, {"a": 1})
    with django_assert_max_num_queries(len(person.captured_queries)):
        operator_client.get(reverse("runs:detail", args=[run.pk]))


# The runs list -----------------------------------------------------------------------


@pytest.fixture
def three_ways(make_trigger, make_task, operator_client) -> dict[str, object]:
    """A run a person started, one a webhook started, one a schedule started."""
    task = make_task([PLANNED, {"content": "ok"}])
    operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    hook = make_trigger(Kind.WEBHOOK, task=task, name="Lead arrived")
    cron = make_trigger(Kind.CRON, task=task, name="Nightly", config={"expression": "0 2 * * *"})
    by_hook = trigger_fire(trigger_id=hook.pk, key="h1", payload={}).run
    by_cron = trigger_fire(trigger_id=cron.pk, key="slot:1", payload={}).run
    return {"hook": hook, "cron": cron, "by_hook": by_hook, "by_cron": by_cron}


def rows(response) -> list[str]:
    page = response.content.decode()
    body = page[page.index('id="run-rows"') :]
    return [row for row in body.split("<tr>")[2:] if "<td" in row and 'class="empty"' not in row]


def test_the_runs_list_filters_by_how_runs_started(three_ways, operator_client):
    everything = rows(operator_client.get(reverse("runs:list")))
    assert len(everything) == 3
    assert any("Lead arrived" in row and "webhook" in row for row in everything)
    assert any("olivia" in row for row in everything)

    webhook = operator_client.get(reverse("runs:list"), {"started": "webhook"})
    assert len(rows(webhook)) == 1 and "Lead arrived" in rows(webhook)[0]
    page = webhook.content.decode()
    assert '<option value="webhook" selected>' in page
    assert 'hx-get="/runs/?started=webhook&amp;page=1"' in page  # rows refresh, filtered

    manual = rows(operator_client.get(reverse("runs:list"), {"started": "manual"}))
    assert len(manual) == 1 and "olivia" in manual[0]
    assert rows(operator_client.get(reverse("runs:list"), {"started": "email"})) == []


def test_the_runs_list_filters_by_the_trigger_and_keeps_every_filter_in_the_url(
    three_ways, operator_client
):
    cron = three_ways["cron"]
    response = operator_client.get(
        reverse("runs:list"), {"trigger": str(cron.pk), "status": "queued"}
    )
    found = rows(response)
    assert len(found) == 1 and "Nightly" in found[0]
    page = response.content.decode()
    assert f'hx-get="/runs/?status=queued&amp;trigger={cron.pk}&amp;page=1"' in page
    assert 'id="trigger-filter"' in page and '<input type="hidden" name="trigger"' in page
    # Every triggered run links to the list of that trigger's runs.
    everything = operator_client.get(reverse("runs:list")).content.decode()
    assert f'href="/runs/?trigger={three_ways["hook"].pk}"' in everything

    partial = operator_client.get(
        reverse("runs:list"), {"trigger": str(cron.pk)}, headers={"HX-Request": "true"}
    ).content.decode()
    assert partial.lstrip().startswith('<div id="run-rows"') and "Nightly" in partial


@pytest.mark.parametrize(
    ("params", "said"),
    [
        ({"started": "carrier-pigeon"}, "No run starts &#x27;carrier-pigeon&#x27;"),
        ({"trigger": "99999999999999999999"}, "trigger: &#x27;99999999999999999999&#x27; is not"),
        ({"trigger": "abc"}, "trigger: &#x27;abc&#x27; is not a trigger&#x27;s id"),
        ({"trigger": "424242"}, "No trigger has the id 424242"),
        ({"trigger": "1\x00"}, "is not a trigger&#x27;s id"),
    ],
)
def test_a_filter_the_list_cannot_take_says_so_and_shows_every_run(
    three_ways, operator_client, params, said
):
    response = operator_client.get(reverse("runs:list"), params)
    assert response.status_code == 200
    page = response.content.decode()
    assert said in page and "all runs are shown" in page
    assert len(rows(response)) == 3


def test_a_bad_filter_beside_a_good_one_keeps_the_good_one(three_ways, operator_client):
    response = operator_client.get(reverse("runs:list"), {"started": "cron", "trigger": "x"})
    assert "the other filters apply" in response.content.decode()
    assert len(rows(response)) == 1


def test_the_filtered_runs_list_is_a_fixed_number_of_queries(
    three_ways, make_trigger, operator_client, django_assert_max_num_queries
):
    hook = three_ways["hook"]
    for number in range(10):
        trigger_fire(trigger_id=hook.pk, key=f"more{number}", payload={})
    # session, user, permissions (2), the inbox count, the trigger filtered by, the
    # runs, their count (the pages), the tasks (the task and model choices)
    with django_assert_max_num_queries(9):
        response = operator_client.get(
            reverse("runs:list"), {"trigger": str(hook.pk), "started": "webhook"}
        )
    assert len(rows(response)) == 11
    with django_assert_max_num_queries(8):
        response = operator_client.get(reverse("runs:list"), {"started": "webhook"})
    assert len(rows(response)) == 11


def test_the_secret_never_reaches_a_page(make_trigger, operator_client, admin_client):
    trigger = make_trigger(Kind.WEBHOOK, secret=secret_new())
    run = trigger_fire(trigger_id=trigger.pk, key="k", payload={"x": 1}).run
    raw = trigger.secret.removeprefix("whsec_")
    for url in (
        reverse("tasks:detail", args=[trigger.task.slug]),
        reverse("runs:detail", args=[run.pk]),
        reverse("runs:list") + f"?trigger={trigger.pk}",
    ):
        assert raw not in operator_client.get(url).content.decode(), url
    for url in (
        reverse("admin:tasks_trigger_change", args=[trigger.pk]),
        reverse("admin:tasks_trigger_changelist"),
        reverse("admin:tasks_task_change", args=[trigger.task.pk]),
        reverse("admin:triggers_firing_changelist"),
    ):
        page = admin_client.get(url)
        assert page.status_code == 200, url
        assert raw not in page.content.decode(), url
    assert json.dumps(trigger.secret) not in json.dumps(run.firing.payload)
