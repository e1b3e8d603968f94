"""A spend budget and a model's prices are never negative: refused in the admin with
the reason, and by the database whatever the path."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, transaction

from tasks.models import ModelPrice, Task

pytestmark = pytest.mark.django_db


def test_a_negative_model_price_is_refused_in_the_admin_and_nothing_saved(admin_client):
    form = {"model": "gpt-cheap", "input_per_million": "-5", "output_per_million": "1"}
    response = admin_client.post("/admin/tasks/modelprice/add/", form)
    assert response.status_code == 200
    assert "Ensure this value is greater than or equal to 0." in response.content.decode()
    assert not ModelPrice.objects.exists()

    form["input_per_million"] = "0.5"
    assert admin_client.post("/admin/tasks/modelprice/add/", form).status_code == 302
    assert ModelPrice.objects.get().input_per_million == 0.5


def test_a_negative_spend_budget_is_refused_in_the_admin_and_nothing_saved(demo_task, admin_client):
    page = admin_client.get(f"/admin/tasks/task/{demo_task.pk}/change/")
    # The form as the admin filled it in, with one field changed.
    shown = page.context["adminform"].form
    form = {name: shown[name].value() for name in shown.fields}
    form = {name: value for name, value in form.items() if value is not None}
    form["max_spend"] = "-1"
    response = admin_client.post(f"/admin/tasks/task/{demo_task.pk}/change/", form)
    assert response.status_code == 200
    assert "Ensure this value is greater than or equal to 0." in response.content.decode()
    demo_task.refresh_from_db()
    assert demo_task.max_spend is None


def test_the_database_refuses_a_negative_price_or_spend_budget(demo_task):
    with pytest.raises(IntegrityError), transaction.atomic():
        ModelPrice.objects.create(model="m", input_per_million=-1, output_per_million=0)
    with pytest.raises(IntegrityError), transaction.atomic():
        Task.objects.filter(pk=demo_task.pk).update(max_spend=-1)
