"""The lineage page tells an auditor, per run, whether the trail is the one recorded and
signed, and if not, what was done to it."""

from __future__ import annotations

import uuid

import pytest
from django.db import transaction
from django.test import Client
from django.urls import reverse

from lineage.models import LineageEvent
from lineage.services import event_append
from tests.lineage.forgery import run_param, tamper
from tests.lineage.test_attacks import finished_run

pytestmark = pytest.mark.django_db


def page(client, run_uuid: uuid.UUID) -> str:
    response = client.get(reverse("runs:lineage:run", args=[run_uuid]))
    assert response.status_code == 200
    return response.content.decode()


def test_a_sealed_trail_is_shown_verified_against_its_checkpoint(
    operator_client, django_assert_num_queries
):
    run_uuid = finished_run(6)
    # The same for any length of trail: the session, the user, the inbox count's three,
    # then the check, the trail's bounds, its events and the run it belongs to.
    with django_assert_num_queries(9):
        text = page(operator_client, run_uuid)
    assert "<strong>Verified.</strong> All 6 events chain correctly" in text
    assert "matches checkpoint #1, signed outside the database" in text
    assert "counted 6 events and sealed the run's end" in text


def test_a_trail_no_checkpoint_covers_says_so(operator_client):
    run_uuid = uuid.uuid4()
    with transaction.atomic():
        event_append(run_uuid=run_uuid, kind="run.queued", actor="olivia", payload={})
    text = page(operator_client, run_uuid)
    assert "Verified." in text and "No signed checkpoint covers this trail yet" in text


def test_a_cut_trail_is_shown_broken_in_words(operator_client):
    run_uuid = finished_run(8)
    tamper(
        "DELETE FROM lineage_lineageevent WHERE run_uuid = %s AND seq > 5", [run_param(run_uuid)]
    )
    text = page(operator_client, run_uuid)
    assert "Not verified: 1 problem found." in text
    assert "<strong>Cut short</strong> at event #6: the trail ends at #5, but checkpoint #1" in text


def test_a_trail_removed_whole_is_shown_removed_and_an_unknown_one_is_404(operator_client):
    run_uuid = finished_run(3)
    tamper("DELETE FROM lineage_lineageevent WHERE run_uuid = %s", [run_param(run_uuid)])
    text = page(operator_client, run_uuid)
    assert "<strong>Removed</strong> at event #1: the whole trail is gone" in text
    assert operator_client.get(reverse("runs:lineage:run", args=[uuid.uuid4()])).status_code == 404
    anonymous = Client().get(reverse("runs:lineage:run", args=[run_uuid]))
    assert anonymous.status_code == 302


def test_the_page_and_the_admin_show_the_payload_as_hashed(operator_client, admin_client):
    run_uuid = uuid.uuid4()
    payload = {"big": 1e20, "minus_zero": -0.0, "text": "nul\x00 lone\ud800"}
    with transaction.atomic():
        event_append(run_uuid=run_uuid, kind="tool.succeeded", actor="engine", payload=payload)
    text = page(operator_client, run_uuid)
    flat = " ".join(text.split())
    assert "<dt>big</dt> <dd><code>1e+20</code></dd>" in flat
    assert "<dt>minus_zero</dt> <dd><code>-0.0</code></dd>" in flat
    assert "nul\\u0000 lone\\ud800" in text
    event = LineageEvent.objects.get(run_uuid=run_uuid)
    admin = admin_client.get(reverse("admin:lineage_lineageevent_change", args=[event.pk]))
    assert admin.status_code == 200 and "1e+20" in admin.content.decode()


def test_a_recorded_text_that_is_not_json_is_shown_as_changed(operator_client):
    run_uuid = finished_run(3, sealed=False)
    event = LineageEvent.objects.get(run_uuid=run_uuid, seq=2)
    tamper("UPDATE lineage_lineageevent SET canonical = 'garbage' WHERE id = %s", [event.pk])
    text = page(operator_client, run_uuid)
    assert "<strong>Changed</strong> at event #2: #2&#x27;s text does not match its hash" in text
    assert "it was changed]" in text
