"""The admin's own pages: nothing in them runs code of a person's choosing, and bad input
gets a 400 that names the field, never a 500 (agentops/admin.py, agentops/bad_input.py)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django_q.models import Schedule

pytestmark = pytest.mark.django_db

SCHEDULE_PERMISSIONS = ["add_schedule", "change_schedule", "delete_schedule", "view_schedule"]


def staff_with(codenames: list[str]) -> Client:
    user = User.objects.create_user("sam", "sam@example.com", "pw-sam-123", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


def superuser() -> Client:
    client = Client(raise_request_exception=False)
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw-root-123"))
    return client


def test_no_one_may_add_a_django_q_schedule_in_the_admin(tmp_path):
    client = staff_with(SCHEDULE_PERMISSIONS)
    marker = tmp_path / "ran"
    response = client.post(
        "/admin/django_q/schedule/add/",
        {
            "name": "x",
            "func": "os.system",
            "args": repr(f"touch {marker}"),
            "schedule_type": "O",
            "repeats": "-1",
            "next_run_0": "2000-01-01",
            "next_run_1": "00:00:00",
        },
    )

    assert response.status_code == 403
    assert not Schedule.objects.filter(func="os.system").exists()


def test_the_reapers_schedule_can_be_seen_but_not_changed_or_deleted():
    client = staff_with(SCHEDULE_PERMISSIONS)
    reaper = Schedule.objects.get(func="agentops.runtime.dispatch.runs_reap_job")

    page = client.get(f"/admin/django_q/schedule/{reaper.pk}/change/")
    assert page.status_code == 200 and "runs_reap_job" in page.content.decode()
    assert 'name="_save"' not in page.content.decode()  # no form to save
    client.post(
        f"/admin/django_q/schedule/{reaper.pk}/change/",
        {"name": reaper.name, "func": "os.system", "schedule_type": "I", "minutes": "1"},
    )
    deleted = client.post(f"/admin/django_q/schedule/{reaper.pk}/delete/", {"post": "yes"})

    assert deleted.status_code == 403
    reaper.refresh_from_db()
    assert reaper.func == "agentops.runtime.dispatch.runs_reap_job"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("/admin/tasks/run/?task=99999999999999999999", "task: '99999999999999999999' is out"),
        ("/admin/tasks/toolgrant/?task=-99999999999999999999", "task: '-99999999999999999999'"),
        ("/admin/tasks/configchange/?task=99999999999999999999", "is out of range"),
        ("/admin/tasks/taskversion/?task=99999999999999999999", "is out of range"),
        ("/admin/tasks/task/?q=" + "x" * 201, "q: a search of at most 200 characters"),
        ("/admin/lineage/lineageevent/?q=" + "x+" * 21, "and 20 words"),
        ("/admin/auth/user/?q=" + "a+" * 1200, "q: a search"),
        ("/admin/tasks/task/?q=a%00b", "q: a NUL character cannot be stored or searched for"),
    ],
)
def test_admin_lists_refuse_what_the_database_cannot_take_with_a_400(url, says):
    response = superuser().get(url)

    assert response.status_code == 400
    assert says in response.content.decode()


def test_an_admin_form_refuses_an_id_no_row_can_have_and_saves_nothing():
    from tasks.models import ToolGrant

    response = superuser().post(
        "/admin/tasks/toolgrant/add/", {"task": "99999999999999999999", "tool": "1"}
    )

    assert response.status_code == 400
    assert "task: '99999999999999999999' is out of range" in response.content.decode()
    assert not ToolGrant.objects.exists()


def test_ordinary_searches_and_filters_still_work():
    client = superuser()
    assert client.get("/admin/tasks/task/?q=reconcile+invoices").status_code == 200
    assert client.get("/admin/tasks/run/?task=12345").status_code == 200
    assert client.get("/admin/django_q/schedule/").status_code == 200
